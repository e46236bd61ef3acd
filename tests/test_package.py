"""The package face: amygdala.* names only, `python -m amygdala`, and the small notebook API."""

from __future__ import annotations

import subprocess
import sys

from tests.server_fixture import build_tiny_readout


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    # From a directory outside the checkout: the repository root must not be what makes imports work.
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_only_namespaced_imports_are_installed(tmp_path):
    ok = _run("import amygdala, amygdala.server, amygdala.engine, amygdala.training.vectors, "
              "amygdala.training.checkpoint, amygdala.memory_graph, amygdala.corpus, amygdala.dream; "
              "print(amygdala.__version__)", tmp_path)
    assert ok.returncode == 0, ok.stderr
    for generic in ("server", "engine", "training", "memory_graph", "corpus", "dream"):
        r = _run(f"import {generic}", tmp_path)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, f"`import {generic}` must fail: {r.stdout}"


def test_import_amygdala_is_cheap(tmp_path):
    r = _run("import sys, amygdala; print('torch' in sys.modules)", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_python_dash_m_amygdala(tmp_path):
    r = subprocess.run([sys.executable, "-m", "amygdala", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "serve" in r.stdout and "steer" in r.stdout, r.stderr


def test_notebook_api(tmp_path, tiny_model_dir, tiny_lm):
    import amygdala
    from amygdala.engine.testing import tiny_model

    readout = build_tiny_readout(tiny_model(), tmp_path / "r")
    am = amygdala.load(model=str(tiny_model_dir), home=tmp_path / "home", readout=readout)
    top = am.read_emotions("a warm blanket and tea by the fire", top_k=3)
    assert len(top) == 3 and top[0].score >= top[1].score and top[0].family in ("warm", "cold")
    assert set(am.scores(["tea", "snow"])) == set(am.concepts)
    res = am.steer("The evening came", {"cozy": 0.5}, max_new_tokens=4)
    assert res.steered.tokens > 0 and "cozy" in res.delta
    assert isinstance(am.generate("Hello", max_new_tokens=3), str)
    with amygdala.open_memory_graph(tmp_path / "home") as g:
        cid = g.submit_correction("c", "p").id
    with amygdala.open_memory_graph(tmp_path / "home", readonly=True) as g:
        assert g.get(cid).preferred == "p"
