"""Several JAX processes on this machine, joined by `jax.distributed` as hosts of a
cluster are: `launch` starts them, each runs a worker function, and it returns what
each one returned (as JSON), with its exit status and error output.

Every process is bounded in time and ended by its pid if it outlives the bound. A
worker is a function `worker(args: dict) -> dict` named as `"module:function"`; it
runs after `jax.distributed.initialize`, with `eqx_norm` imported under
jaxtyping's runtime checks and strict dtype promotion, as in the tests. `note`
records a value as it happens, so that a process that is killed still reports.
"""

import dataclasses
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Process:
    """One process of a launch."""

    index: int
    returncode: int | None  # None: still running at the deadline, then killed
    result: Any  # what the worker returned, or None
    notes: dict[str, Any]  # what it recorded with `note`
    stderr: str
    ended: float  # time.time() at which it was seen to end

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    worker: str,
    args: dict[str, Any] | None = None,
    *,
    processes: int = 2,
    devices: int = 4,
    timeout: float = 120,
    heartbeat: int = 30,
    checked: bool = True,
    folder: Path,
) -> Callable[[], list[Process]]:
    """Start `worker` in `processes` processes of `devices` CPU devices each, and
    return the function that waits for them: it returns them in process order once
    all have ended (or `timeout` seconds after the start: those still running are
    then killed by their pid). Their end times are those seen while waiting.

    `heartbeat` is given to `jax.distributed.initialize` as
    `heartbeat_timeout_seconds` and `shutdown_timeout_seconds`: a process that dies
    is noticed by the others after about that long. `checked` imports `eqx_norm`
    under jaxtyping's runtime checks (slower to start).
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # each process has `devices` devices, by jax config
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    env["PYTHONUNBUFFERED"] = "1"
    children = []
    for i in range(processes):
        spec = {
            "worker": worker,
            "args": args or {},
            "index": i,
            "processes": processes,
            "devices": devices,
            "port": port,
            "heartbeat": heartbeat,
            "checked": checked,
            "folder": str(folder),
        }
        stderr = open(folder / f"stderr-{i}.txt", "wb")
        children.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "tests.io.multihost", json.dumps(spec)],
                    cwd=ROOT,
                    env=dict(env, MULTIHOST_NOTES=str(folder / f"notes-{i}.jsonl")),
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=subprocess.STDOUT,
                ),
                stderr,
            )
        )
    deadline = time.monotonic() + timeout
    return lambda: _wait(children, deadline, folder)


def launch(*args: Any, **kwargs: Any) -> list[Process]:
    """`start(...)`, then wait for the processes."""
    return start(*args, **kwargs)()


def _wait(
    children: list[tuple[subprocess.Popen, Any]], deadline: float, folder: Path
) -> list[Process]:
    processes = len(children)
    ended: dict[int, float] = {}
    try:
        while len(ended) < processes and time.monotonic() < deadline:
            for i, (child, _) in enumerate(children):
                if i not in ended and child.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.02)
    finally:
        for i, (child, stderr) in enumerate(children):
            if child.poll() is None:
                child.kill()
            child.wait(timeout=30)
            stderr.close()
    out = []
    for i, (child, _) in enumerate(children):
        result_file = folder / f"result-{i}.json"
        notes_file = folder / f"notes-{i}.jsonl"
        notes = {}
        if notes_file.exists():
            for line in notes_file.read_text().splitlines():
                notes.update(json.loads(line))
        out.append(
            Process(
                index=i,
                returncode=child.returncode if i in ended else None,
                result=json.loads(result_file.read_text())
                if result_file.exists()
                else None,
                notes=notes,
                stderr=(folder / f"stderr-{i}.txt").read_text(errors="replace"),
                ended=ended.get(i, time.time()),
            )
        )
    return out


def results(launched: list[Process]) -> list[Any]:
    """What every process returned, or an `AssertionError` showing the end of the
    error output of those that failed."""
    failed = [p for p in launched if not p.ok]
    if failed:
        raise AssertionError(
            "\n\n".join(
                f"process {p.index} ended with {p.returncode}:\n{p.stderr[-3000:]}"
                for p in failed
            )
        )
    return [p.result for p in launched]


def note(**values: Any) -> None:
    """Record values from inside a worker, written to disk at once (so that they
    survive the process being killed)."""
    with open(os.environ["MULTIHOST_NOTES"], "a") as f:
        f.write(json.dumps(values) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _child(spec: dict[str, Any]) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", spec["devices"])
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.distributed.initialize(
        f"127.0.0.1:{spec['port']}",
        num_processes=spec["processes"],
        process_id=spec["index"],
        initialization_timeout=60,
        heartbeat_timeout_seconds=spec["heartbeat"],
        shutdown_timeout_seconds=spec["heartbeat"],
    )
    if spec["checked"]:
        from jaxtyping import install_import_hook

        with install_import_hook("eqx_norm", "beartype.beartype"):
            import eqx_norm  # noqa: F401

    folder = Path(spec["folder"])
    module, name = spec["worker"].split(":")
    result = getattr(importlib.import_module(module), name)(spec["args"])
    tmp = folder / f".result-{spec['index']}.json"
    tmp.write_text(json.dumps(result))
    tmp.replace(folder / f"result-{spec['index']}.json")


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
