"""Writer processes for the memory-graph durability tests.

`python tests/memgraph_writer.py serve` imports memory_graph once and then forks a fresh writer
process per command, so a test can start and SIGKILL hundreds of real writer processes without
paying interpreter start-up and imports each time. Commands (one per line on stdin):

    write DIR PREFIX START COUNT SNAPSHOT_EVERY [START_AT]
                                                  fork a writer (it starts writing at unix time
                                                  START_AT if given); it prints "ack PREFIX I" after
                                                  each acknowledged write, "done PREFIX" at the end
    hold DIR SECONDS                              fork a process that holds the writer lock
    reap PID                                      wait for a child; prints "reaped PID CODE"
    quit

The server answers each fork with "pid PID". Children write their lines with one os.write each
(atomic for short lines on a pipe), so lines from different processes never interleave.
"""

from __future__ import annotations

import os
import sys
import time


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _writer(directory: str, prefix: str, start: int, count: int, snapshot_every: int, start_at: float) -> None:
    from amygdala.memory_graph import MemoryGraph

    g = MemoryGraph(directory, snapshot_every=snapshot_every or None, lock_timeout=60)
    time.sleep(max(0.0, start_at - time.time()))  # lets two writers start their loops together
    for i in range(start, start + count):
        g.add_memory(f"{prefix} write {i}\nemotion: curious={(i % 10) / 10}", idempotency_key=f"{prefix}-{i}")
        _say(f"ack {prefix} {i}")
    g.close()
    _say(f"done {prefix}")


def _holder(directory: str, seconds: float) -> None:
    from amygdala.memory_graph import MemoryGraph

    g = MemoryGraph(directory)
    with g.batch():
        _say("holding")
        time.sleep(seconds)
    g.close()


def _fork(target, *args) -> None:  # type: ignore[no-untyped-def]
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target(*args)
        except BaseException as exc:  # report, never fall back into the server loop
            _say(f"error {type(exc).__name__}: {exc}")
            code = 1
        finally:
            os._exit(code)
    _say(f"pid {pid}")


def serve() -> None:
    import memory_graph  # noqa: F401  (imported once, inherited by every fork)

    _say("ready")
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "write":
            directory, prefix, start, count, every, *start_at = args
            _fork(_writer, directory, prefix, int(start), int(count), int(every), float(start_at[0]) if start_at else 0.0)
        elif cmd == "hold":
            _fork(_holder, args[0], float(args[1]))
        elif cmd == "reap":
            pid = int(args[0])
            _, status = os.waitpid(pid, 0)
            _say(f"reaped {pid} {status}")
        elif cmd == "quit":
            return


class WriterServer:
    """Test-side handle on `serve`: send commands, read its lines with a timeout."""

    def __init__(self) -> None:
        import queue
        import subprocess
        import threading
        from pathlib import Path

        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "serve"], cwd=repo, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: "queue.Queue[str | None]" = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        assert self.expect("ready", timeout=60) == "ready"

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 60.0) -> str:
        import queue

        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"writer server said nothing for {timeout}s") from None
        if item is None:
            raise AssertionError(f"writer server exited (code {self.proc.poll()})")
        if item.startswith("error "):
            raise AssertionError(f"writer process failed: {item}")
        return item

    def expect(self, prefix: str, timeout: float = 60.0, sink: "list[str] | None" = None) -> str:
        """Read lines until one starts with `prefix`; earlier lines go to `sink`."""
        while True:
            item = self.line(timeout)
            if item.startswith(prefix):
                return item
            if sink is not None:
                sink.append(item)

    def fork(self, command: str, sink: "list[str] | None" = None) -> int:
        self.send(command)
        return int(self.expect("pid ", sink=sink).split()[1])

    def close(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._pump.join(timeout=10)  # it stops at EOF; closing its pipe under it would raise there
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


if __name__ == "__main__":
    serve()
