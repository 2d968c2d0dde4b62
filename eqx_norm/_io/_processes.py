"""Checkpoints on several processes: every process takes part in a save or a load,
each step that can fail runs where it must and its outcome is shared before any
process goes on, and arrays sharded across processes are written and read with
Orbax in a folder beside the checkpoint's file."""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jaxtyping import PyTree

# ---------------------------------------------------------------- several processes
# A checkpoint is written by every process together: each step that can fail is
# run where it must (on process 0, or on all), and its outcome is shared with one
# small all-gather before any process goes on, so that a failure is the same error
# on every process rather than some processes waiting for the others forever.

_OUTCOME_BYTES = 4096
_ERRORS = {
    e.__name__: e
    for e in (
        FileNotFoundError,
        IsADirectoryError,
        PermissionError,
        OSError,
        ValueError,
        TypeError,
        ImportError,
    )
}


def share(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's outcome, in process order (a collective: every process must
    call it)."""
    data = json.dumps(outcome).encode()[:_OUTCOME_BYTES]
    buffer = np.frombuffer(data.ljust(_OUTCOME_BYTES), np.uint8)
    every = multihost_utils.process_allgather(buffer)
    return [json.loads(bytes(row).decode(errors="replace")) for row in every]


def run_here(fn, here: bool) -> tuple[Any, BaseException | None, dict[str, Any]]:
    if not here:
        return None, None, {}
    try:
        value = fn()
        return value, None, {"value": value}
    except BaseException as e:  # a KeyboardInterrupt too: the others must hear of it
        return None, e, {"error": type(e).__name__, "message": str(e)[:800]}


def raise_first_error(outcomes: list[dict[str, Any]], mine: BaseException | None):
    if mine is not None:
        raise mine
    for p, outcome in enumerate(outcomes):
        if "error" in outcome:
            name, message = outcome["error"], outcome["message"]
            if name in _ERRORS:
                raise _ERRORS[name](f"{message} (on process {p})")
            raise RuntimeError(f"a checkpoint failed on process {p}: {name}: {message}")


def on_process_zero(fn) -> Any:
    """`fn()` run on process 0; its value on every process, or its error raised on
    every process."""
    value, error, outcome = run_here(fn, jax.process_index() == 0)
    outcomes = share(outcome)
    raise_first_error(outcomes, error)
    return outcomes[0]["value"] if value is None else value


def split_across_processes(x: Any) -> bool:
    """Whether no process holds all of `x`."""
    return (
        isinstance(x, jax.Array)
        and not x.is_fully_addressable
        and not x.is_fully_replicated
    )


def local_copy(x: Any) -> Any:
    """This process's copy of an array replicated over processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def place_like(loaded: Any, like: Any) -> Any:
    """A loaded leaf, placed with the sharding of the array it replaces (on one
    device or several, of one process or several)."""
    if isinstance(like, jax.Array) and eqx.is_array(loaded):
        return jax.device_put(loaded, like.sharding)
    return loaded


def _arrays_pattern(path: Path) -> re.Pattern[str]:
    # The folder, and the temporary folder Orbax writes it in.
    return re.compile(re.escape(path.name) + r"\.[0-9a-f]{16}\.orbax(\..*)?")


def tidy(path: Path, keep: str | None) -> None:
    """Remove the array folders of earlier checkpoints at `path` (of saves that were
    replaced, failed or killed), all but `keep`."""
    pattern = _arrays_pattern(path)
    for entry in path.parent.iterdir():
        if entry.name != keep and pattern.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def describe_leaf(x: Any) -> dict[str, Any]:
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    return {"shape": list(np.shape(x)), "dtype": np.dtype(dtype).name}


def valid_arrays_header(header: dict[str, Any]) -> bool:
    arrays, leaves = header.get("arrays"), header.get("leaves")
    return (
        isinstance(arrays, str)
        and re.fullmatch(r"[^/\\]+\.[0-9a-f]{16}\.orbax", arrays) is not None
        and not arrays.startswith(".")
        and isinstance(leaves, list)
        and all(
            isinstance(leaf, dict)
            and isinstance(leaf.get("dtype"), str)
            and isinstance(leaf.get("shape"), list)
            and all(
                isinstance(n, int) and not isinstance(n, bool) for n in leaf["shape"]
            )
            for leaf in leaves
        )
    )


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            "`eqx_norm.save` and `eqx_norm.load` of arrays sharded across processes "
            "read and write them with Orbax, which is not installed: "
            "`pip install 'eqx_norm[distributed]'` (or `orbax-checkpoint`)."
        ) from e
    return ocp


def write_arrays(parent: Path, folder: str, arrays: list[Any]) -> None:
    """Write the arrays to a new Orbax folder, from every process; on failure
    anywhere, what was written of it is removed and every process raises."""

    def write():
        ocp = _orbax()
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        try:
            tree = {str(i): x for i, x in enumerate(arrays)}
            checkpointer.save(parent / folder, args=ocp.args.StandardSave(tree))
        finally:
            checkpointer.close()

    _, error, outcome = run_here(write, True)
    outcomes = share(outcome)
    if any("error" in o for o in outcomes):

        def remove():
            for entry in parent.iterdir():
                if entry.name == folder or entry.name.startswith(folder + "."):
                    shutil.rmtree(entry, ignore_errors=True)

        on_process_zero(remove)  # before any process raises
        raise_first_error(outcomes, error)


def read_arrays(path: Path, header: dict[str, Any], tree: PyTree) -> PyTree:
    """The leaves of `tree`, read from the Orbax folder named in the header, each
    array with the sharding of the one it replaces."""
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if eqx.is_array_like(x)]
    saved = header["leaves"]
    have = [describe_leaf(leaves[i]) for i in where]
    if have != saved:
        if len(have) != len(saved):
            what = f"{len(saved)} arrays were saved, this model has {len(have)}"
        else:
            k = next(k for k, (a, b) in enumerate(zip(have, saved)) if a != b)
            what = f"array {k} was saved as {saved[k]}, this model has {have[k]}"
        raise ValueError(f"{path}: does not match this model's structure: {what}.")
    folder = path.parent / header["arrays"]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{path}: its arrays are in the folder {str(folder)!r}, which is "
            "missing; a checkpoint of arrays sharded across processes is the file "
            "and that folder beside it: copy them together."
        )

    def target(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    ocp = _orbax()
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        wanted = {str(k): target(leaves[i]) for k, i in enumerate(where)}
        restored = checkpointer.restore(folder, args=ocp.args.StandardRestore(wanted))
    finally:
        checkpointer.close()
    for k, i in enumerate(where):
        leaves[i] = restored[str(k)]
    return jax.tree.unflatten(treedef, leaves)
