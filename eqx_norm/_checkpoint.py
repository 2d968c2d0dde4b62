import dataclasses
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jaxtyping import PyTree

from ._approaches import APPROACHES
from ._walk import batch_norms

_FORMAT = "eqx_norm-checkpoint"
_VERSION = 2  # one file: the header, then the leaves
_SHARDED = 3  # the header only; the arrays in the Orbax folder it names
_READS = (1, 2, 3)  # version 1 described approaches by their repr


def _approach_key(approach) -> str:
    """A description of an approach that is equal for equal approaches: its class
    and every hyperparameter, defaults included, numbers as floats (`Renorm()` and
    `Renorm(r_max=3)` are equal; their reprs are not)."""

    def value(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return repr(float(v))
        return repr(v)

    fields = ", ".join(
        f"{f.name}={value(getattr(approach, f.name))}"
        for f in dataclasses.fields(approach)
    )
    return f"{type(approach).__name__}({fields})"


def _describe(model: PyTree, state: eqx.nn.State) -> list[dict[str, Any]]:
    out = []
    for path, bn in batch_norms(model):
        mean, _ = bn.statistics(state)
        out.append(
            {
                "path": path,
                "approach": _approach_key(bn.approach),
                "approach_repr": repr(bn.approach),
                "input_size": bn.input_size,
                "statistics_dtype": str(jnp.dtype(mean.dtype)),
                "parameter_dtype": None if bn.weight is None else str(bn.weight.dtype),
            }
        )
    return out


def save(path: str | Path, model: PyTree, state: eqx.nn.State) -> None:
    """Save a model and its state to one file: a header describing every
    [`eqx_norm.BatchNorm`][] (approach, channels, dtypes), then the leaves as
    `eqx.tree_serialise_leaves` writes them.

    The file is written whole or not at all: it is written to a temporary file
    beside `path`, flushed to disk, then renamed over `path`. If anything fails (a
    full disk, a model that cannot be serialised), an existing file at `path` is
    left as it was and no temporary file remains.

    On several hosts (after `jax.distributed.initialize()`), call it on every
    process with the same `path` on a file system they share; it returns, or
    raises the same error, on every process. Process 0 writes the file. Where an
    array is sharded across processes (no process holds all of it), the file
    holds the header only and the arrays go to a folder beside it,
    `<path>.<16 hex digits>.orbax`, written by every process with
    [Orbax](https://orbax.readthedocs.io) (`pip install 'eqx_norm[distributed]'`);
    the rename of the file is still the moment the new checkpoint replaces the
    old, and the folder of the old one is removed after it. A save that fails or
    is killed on any process leaves the previous checkpoint loadable.

    **Arguments:**

    - `path`: the file to write. An existing file keeps its permissions; a new
        one gets those of any new file (`0o666` less the umask).
    - `model`: the model.
    - `state`: its `eqx.nn.State`.

    **Raises:**

    A `FileNotFoundError` if the folder of `path` does not exist, an
    `IsADirectoryError` if `path` is a folder, and a `PermissionError` if it is a
    file without write permission (which the rename would otherwise replace), each
    naming `path` and leaving it as it was. An `ImportError` naming the extra to
    install if arrays are sharded across processes and Orbax is missing.
    """
    path = Path(path)
    header = {"format": _FORMAT, "version": _VERSION, "layers": _describe(model, state)}
    if jax.process_count() == 1:
        _write(path, header, (model, state))
        _tidy(path, keep=None)
        return
    leaves = jax.tree.leaves((model, state))
    if not any(_split_across_processes(x) for x in leaves):
        # Every array is whole on every process: process 0 writes the one file.
        local = jax.tree.map(_local_copy, (model, state))
        _on_process_zero(lambda: (_write(path, header, local), _tidy(path, keep=None)))
        return
    folder = _on_process_zero(lambda: _new_folder(path))
    arrays = [x for x in leaves if eqx.is_array_like(x)]
    _write_arrays(path.parent, folder, arrays)
    header = {
        **header,
        "version": _SHARDED,
        "arrays": folder,
        "leaves": [_describe_leaf(x) for x in arrays],
    }
    _on_process_zero(lambda: (_write(path, header, None), _tidy(path, keep=folder)))


def _write(path: Path, header: dict[str, Any], tree: PyTree | None) -> None:
    """Write the header and the leaves of `tree` (if any) to a temporary file beside
    `path`, flush it to disk, then rename it over `path`."""
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            if tree is not None:
                eqx.tree_serialise_leaves(f, tree)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _mode_for(path: Path) -> int:
    """The permissions the file at `path` should have after `save`, or an `OSError`
    naming `path` if it cannot be written there."""
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"`eqx_norm.save`: the folder {str(path.parent)!r} of {str(path)!r} does "
            "not exist; create it first, e.g. "
            "`path.parent.mkdir(parents=True, exist_ok=True)`."
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"`eqx_norm.save`: {str(path)!r} is a folder; pass a file path in it, "
            f"e.g. {str(path / 'model.eqx')!r}."
        )
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if not mode & 0o222:
            raise PermissionError(
                f"`eqx_norm.save`: {str(path)!r} is read-only, and saving would "
                "replace it; make it writable first (`chmod u+w`) or save to "
                "another path."
            )
        return mode
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_KEYS = {
    "path": str,
    "approach": str,
    "input_size": int,
    "statistics_dtype": str,
    "parameter_dtype": (str, type(None)),
}


def _read_header(path: Path, line: bytes) -> tuple[list[dict[str, Any]], int, dict]:
    """The layers, version and whole header of a checkpoint, or a `ValueError`
    naming the fault."""

    def fault(what: str) -> ValueError:
        return ValueError(
            f"{path}: not a checkpoint written by `eqx_norm.save` of this version "
            f"({what}). For a file of `eqx.tree_serialise_leaves`, use "
            "`eqx.tree_deserialise_leaves`."
        )

    try:
        header = json.loads(line)
    except ValueError:
        raise fault("the first line is not a JSON header") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise fault(f"the header does not say format {_FORMAT!r}")
    version = header.get("version")
    if version not in _READS or isinstance(version, bool):
        raise fault(
            f"format version {version!r}, but this eqx_norm reads versions "
            f"{', '.join(map(str, _READS))} (upgrade eqx_norm to read newer "
            "checkpoints)"
        )
    layers = header.get("layers")
    if not isinstance(layers, list):
        raise fault("the header's `layers` is missing or not a list")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise fault(f"layer entry {i} of the header is not an object")
        for key, kind in _KEYS.items():
            value = layer.get(key, ...)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise fault(f"layer entry {i} of the header has no valid {key!r}")
    paths = [layer["path"] for layer in layers]
    if len(set(paths)) != len(paths):
        raise fault("the header lists a layer twice")
    if version == _SHARDED and not _valid_sharded_header(header):
        raise fault("the header's `arrays` or `leaves` is missing or malformed")
    return layers, version, header


def load(
    path: str | Path, model: PyTree, state: eqx.nn.State
) -> tuple[PyTree, eqx.nn.State]:
    """Load a model and state saved by [`eqx_norm.save`][] into the structure of
    `model` and `state`, after checking that every BatchNorm layer matches.

    Nothing is modified in place: the given `model` and `state` only describe the
    structure, and on any error they are as they were.

    **Arguments:**

    - `path`: the file written by `eqx_norm.save`.
    - `model`, `state`: a model and state of the same structure (e.g. freshly made
        with `eqx.nn.make_with_state`). On several hosts, call it on every process;
        each array that is split across processes, or replicated over them, comes
        back with the sharding of the one it replaces (whatever the sharding it
        was saved with), so that a model placed on the mesh comes back on it.

    **Returns:**

    A 2-tuple `(model, state)` holding the saved values.

    **Raises:**

    A `ValueError` naming the file and the fault if it is not a checkpoint of this
    format and version (a malformed or truncated header, or leaves that do not
    match), or naming the layer and the mismatch if a BatchNorm layer differs in
    approach (named as it is written: `"batch"`, `eqx_norm.Renorm(r_max=4)`, or a
    class of your own by its name, with the `eqx_norm.set_approach` call that makes
    the model match), channel count or dtype. A `FileNotFoundError` naming the
    folder if the arrays of a checkpoint of arrays sharded across processes are not
    beside the file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        line = f.readline()
        layers, version, header = _read_header(path, line)
        saved = {layer["path"]: layer for layer in layers}
        expected = {layer["path"]: layer for layer in _describe(model, state)}
        if version == 1:
            for layer in expected.values():
                layer["approach"] = layer["approach_repr"]
        if saved.keys() != expected.keys():
            raise ValueError(
                f"{path}: the saved model has BatchNorm layers at {sorted(saved)}, "
                f"this model at {sorted(expected)}."
            )
        for name, want in expected.items():
            got = saved[name]
            if got["approach"] != want["approach"]:
                raise _approach_mismatch(path, name, got, want, saved, expected)
            for key in ("input_size", "statistics_dtype", "parameter_dtype"):
                if got[key] != want[key]:
                    raise ValueError(
                        f"{path}: the BatchNorm layer at {name!r} was saved with "
                        f"{key}={got[key]!r}, but this model has {key}={want[key]!r}. "
                        "Build the model with the saved settings."
                    )
        if version == _SHARDED:
            return _read_arrays(path, header, (model, state))
        try:
            loaded = eqx.tree_deserialise_leaves(f, (model, state))
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"{path}: does not match this model's structure: {e}"
            ) from e
    if jax.process_count() == 1:
        return loaded
    return jax.tree.map(_place_like, loaded, (model, state))


def _approach_name(key: str, text: str) -> str:
    """An approach as a user writes it, from its key and repr: `"batch"` for a
    built-in with its defaults, `eqx_norm.Renorm(r_max=4)` for one with others, and
    a user's own class by its name."""
    for name, cls in APPROACHES.items():
        default = cls()
        if key in (_approach_key(default), repr(default)):
            return f'"{name}"'
    class_name = key.split("(", 1)[0]
    if class_name in {cls.__name__ for cls in APPROACHES.values()}:
        return f"eqx_norm.{text}"
    return class_name


def _approach_mismatch(
    path: Path,
    name: str,
    got: dict[str, Any],
    want: dict[str, Any],
    saved: dict[str, dict[str, Any]],
    expected: dict[str, dict[str, Any]],
) -> ValueError:
    """The error of a layer saved with another approach, with the call that fixes
    it."""
    got_text = got.get("approach_repr", got["approach"])
    got_name = _approach_name(got["approach"], got_text)
    want_name = _approach_name(want["approach"], want["approach_repr"])
    if got_name == want_name:  # a user's class with other hyperparameters
        got_name, want_name = got_text, want["approach_repr"]
    code = got_name if got_name.startswith(('"', "eqx_norm.")) else got_text
    # `set_approach` switches every layer; `where=` is needed where only some differ.
    everywhere = all(
        saved[n]["approach"] == got["approach"] != expected[n]["approach"]
        for n in expected
    )
    where = "" if everywhere else ", where=..."
    return ValueError(
        f"{path}: the BatchNorm layer at {name!r} was saved with approach "
        f"{got_name}, but this model has approach {want_name}. Give the model the "
        f"saved approach before loading: `model = eqx_norm.set_approach(model, "
        f"{code}{where})`"
        + ("" if everywhere else " (`where=` choosing the layers saved with it)")
        + "; the state stays valid."
    )


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


def _share(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's outcome, in process order (a collective: every process must
    call it)."""
    data = json.dumps(outcome).encode()[:_OUTCOME_BYTES]
    buffer = np.frombuffer(data.ljust(_OUTCOME_BYTES), np.uint8)
    every = multihost_utils.process_allgather(buffer)
    return [json.loads(bytes(row).decode(errors="replace")) for row in every]


def _run(fn, here: bool) -> tuple[Any, BaseException | None, dict[str, Any]]:
    if not here:
        return None, None, {}
    try:
        value = fn()
        return value, None, {"value": value}
    except BaseException as e:  # a KeyboardInterrupt too: the others must hear of it
        return None, e, {"error": type(e).__name__, "message": str(e)[:800]}


def _raise_first_error(outcomes: list[dict[str, Any]], mine: BaseException | None):
    if mine is not None:
        raise mine
    for p, outcome in enumerate(outcomes):
        if "error" in outcome:
            name, message = outcome["error"], outcome["message"]
            if name in _ERRORS:
                raise _ERRORS[name](f"{message} (on process {p})")
            raise RuntimeError(f"a checkpoint failed on process {p}: {name}: {message}")


def _on_process_zero(fn) -> Any:
    """`fn()` run on process 0; its value on every process, or its error raised on
    every process."""
    value, error, outcome = _run(fn, jax.process_index() == 0)
    outcomes = _share(outcome)
    _raise_first_error(outcomes, error)
    return outcomes[0]["value"] if value is None else value


def _split_across_processes(x: Any) -> bool:
    """Whether no process holds all of `x`."""
    return (
        isinstance(x, jax.Array)
        and not x.is_fully_addressable
        and not x.is_fully_replicated
    )


def _local_copy(x: Any) -> Any:
    """This process's copy of an array replicated over processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def _place_like(loaded: Any, like: Any) -> Any:
    """A loaded leaf, placed as the leaf it replaces where that spans processes."""
    if isinstance(like, jax.Array) and not like.is_fully_addressable:
        return jax.device_put(loaded, like.sharding)
    return loaded


def _arrays_pattern(path: Path) -> re.Pattern[str]:
    # The folder, and the temporary folder Orbax writes it in.
    return re.compile(re.escape(path.name) + r"\.[0-9a-f]{16}\.orbax(\..*)?")


def _new_folder(path: Path) -> str:
    """A new name for the arrays of the checkpoint at `path`, after checking that
    `path` can be written."""
    _mode_for(path)
    return f"{path.name}.{secrets.token_hex(8)}.orbax"


def _tidy(path: Path, keep: str | None) -> None:
    """Remove the array folders of earlier checkpoints at `path` (of saves that were
    replaced, failed or killed), all but `keep`."""
    pattern = _arrays_pattern(path)
    for entry in path.parent.iterdir():
        if entry.name != keep and pattern.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _describe_leaf(x: Any) -> dict[str, Any]:
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    return {"shape": list(np.shape(x)), "dtype": np.dtype(dtype).name}


def _valid_sharded_header(header: dict[str, Any]) -> bool:
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


def _write_arrays(parent: Path, folder: str, arrays: list[Any]) -> None:
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

    _, error, outcome = _run(write, True)
    outcomes = _share(outcome)
    if any("error" in o for o in outcomes):

        def remove():
            for entry in parent.iterdir():
                if entry.name == folder or entry.name.startswith(folder + "."):
                    shutil.rmtree(entry, ignore_errors=True)

        _on_process_zero(remove)  # before any process raises
        _raise_first_error(outcomes, error)


def _read_arrays(path: Path, header: dict[str, Any], tree: PyTree) -> PyTree:
    """The leaves of `tree`, read from the Orbax folder named in the header, each
    array with the sharding of the one it replaces."""
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if eqx.is_array_like(x)]
    saved = header["leaves"]
    have = [_describe_leaf(leaves[i]) for i in where]
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
