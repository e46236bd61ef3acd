"""vLLM entry points: the general plugin (every vLLM process) and the endpoint plugin (API server).

General plugin (`vllm.general_plugins`, `register`). vLLM calls it in every process it starts,
possibly several times, and in processes that have nothing to do with amygdala (a co-installed
trainer using vLLM must not find its engine forced into eager mode: a bug vllm-lens shipped). So it
does nothing unless `AMYGDALA_VLLM=1` is set, which the amygdala launcher (`amygdala serve --backend
vllm`) and `VllmBackend` set for their own process tree. Then it patches `EngineArgs.
create_engine_config` once (a marker on the wrapper makes it idempotent) so every engine built in
that tree gets our worker extension and eager mode, and defaults `VLLM_USE_V2_MODEL_RUNNER=0`.

Endpoint plugin (`vllm.endpoint_plugins`, `endpoint_plugin`). Mounted only when `VLLM_PLUGINS` names
`amygdala`; the same name is used in both groups, because once VLLM_PLUGINS is set it filters the
general plugins too. It mounts /train, /train/status, /train/jobs/{id}, /train/rollback and
/checkpoint. Routes exist before the engine does (vLLM attaches routers first, then calls
init_state with the engine client), so each path dispatches to the handler a *provider* builds in
init_state. Providers come from the `amygdala.vllm_train_routes` entry-point group, a callable
(engine_client, args) -> list of Starlette routes; engine cannot import training, so the training
layer fills that group. Without a provider the paths answer 503 saying so.

Every path honours the one auth rule of amygdala's listeners: with `AMYGDALA_TOKEN` set, requests
need `Authorization: Bearer <token>` (vLLM's own --api-key guards only its /v1 routes).

Nothing at module level imports vllm: this module imports, and its logic is tested, without it.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

PLUGIN_NAME = "amygdala"
OPT_IN_ENV = "AMYGDALA_VLLM"
TOKEN_ENV = "AMYGDALA_TOKEN"  # = amygdala.training.http_security.TOKEN_ENV (a test keeps them equal)
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
WORKER_EXTENSION = "amygdala.engine.backends.vllm.worker.AmygdalaWorkerExtension"
ROUTES_GROUP = "amygdala.vllm_train_routes"
TRAIN_PATHS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/train", ("POST",)),
    ("/train/status", ("GET",)),
    ("/train/jobs/{job_id}", ("GET",)),
    ("/train/rollback", ("POST",)),
    ("/checkpoint", ("POST",)),
)


class PluginError(RuntimeError):
    """The plugin cannot configure this engine; the message says what conflicts."""


# -- general plugin ------------------------------------------------------------------------------

def opted_in(environ: dict[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(OPT_IN_ENV) == "1"


def configure_engine_args(args: Any) -> None:
    """Our worker extension and eager mode on one EngineArgs; refuses to replace someone else's extension."""
    current = getattr(args, "worker_extension_cls", "") or ""
    if current and current != WORKER_EXTENSION:
        raise PluginError(f"worker_extension_cls is already {current!r}; amygdala needs {WORKER_EXTENSION!r}. "
                          "vLLM takes one extension class: unset the other, or subclass both into one class")
    args.worker_extension_cls = WORKER_EXTENSION
    args.enforce_eager = True


def patch_engine_args(engine_args_cls: type) -> bool:
    """Wrap `create_engine_config` to call configure_engine_args first; False if already wrapped."""
    original = engine_args_cls.create_engine_config
    if getattr(original, "_amygdala_patched", False):
        return False

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        configure_engine_args(self)
        return original(self, *args, **kwargs)

    create_engine_config._amygdala_patched = True  # type: ignore[attr-defined]
    engine_args_cls.create_engine_config = create_engine_config  # type: ignore[method-assign]
    return True


def register() -> None:
    """`vllm.general_plugins` entry point: idempotent, and a no-op outside amygdala's process tree."""
    if not opted_in():
        return
    os.environ.setdefault(RUNNER_ENV, "0")
    if os.environ[RUNNER_ENV] != "0":
        log.warning("%s=%s: amygdala's hooks need the V1 model runner; workers will refuse to install them",
                    RUNNER_ENV, os.environ[RUNNER_ENV])
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:  # vLLM calls this; without vLLM there is nothing to configure
        return
    patch_engine_args(EngineArgs)


# -- endpoint plugin -----------------------------------------------------------------------------

RoutesProvider = Callable[[Any, Any], list]


def providers_from_entry_points() -> list[RoutesProvider]:
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=ROUTES_GROUP):
        try:
            out.append(ep.load())
        except Exception:
            log.exception("cannot load %s provider %s", ROUTES_GROUP, ep.name)
    return out


def _authorized(request: Any) -> bool:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        return True
    got = request.headers.get("authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())


class AmygdalaEndpoints:
    """vLLM's EndpointPlugin protocol: name, required_tasks, attach_router(app), init_state(...)."""

    name = PLUGIN_NAME
    required_tasks: tuple[str, ...] | None = ("generate",)

    def __init__(self, providers: list[RoutesProvider] | None = None):
        self._providers = providers
        self.handlers: dict[str, Callable] = {}
        self.reason = ("no training service is wired into this server: install amygdala with the [vllm] extra and "
                       "start it with `amygdala serve --backend vllm`, which provides one")

    def attach_router(self, app: Any) -> None:
        from starlette.routing import Route

        for path, methods in TRAIN_PATHS:
            app.router.routes.append(Route(path, self._dispatcher(path), methods=list(methods)))

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is None:
            self.reason = "this vLLM server has no engine (render-only); training needs one"
            return
        providers = self._providers if self._providers is not None else providers_from_entry_points()
        for provider in providers:
            for route in provider(engine_client, args):
                self.handlers[route.path] = route.endpoint
        if state is not None:
            state.amygdala_train_paths = sorted(self.handlers)

    def _dispatcher(self, path: str) -> Callable:
        from starlette.responses import JSONResponse

        async def dispatch(request: Any) -> Any:
            if not _authorized(request):
                return JSONResponse({"error": f"missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                                              f"with the token the server was started with ({TOKEN_ENV})"},
                                    status_code=401)
            handler = self.handlers.get(path)
            if handler is None:
                return JSONResponse({"error": self.reason}, status_code=503)
            return await handler(request)

        return dispatch


def endpoint_plugin() -> AmygdalaEndpoints:
    """`vllm.endpoint_plugins` entry point: vLLM calls it with no arguments."""
    return AmygdalaEndpoints()
