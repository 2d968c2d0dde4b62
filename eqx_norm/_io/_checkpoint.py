import dataclasses
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._nn._approaches import APPROACHES
from .._tools._walk import batch_norms, is_batch_norm
from ._processes import (
    describe_leaf,
    local_copy,
    on_process_zero,
    place_like,
    read_arrays,
    split_across_processes,
    tidy,
    valid_arrays_header,
    write_arrays,
)

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


def _layer_headers(model: PyTree, state: eqx.nn.State) -> list[dict[str, Any]]:
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

    ```python
    eqx_norm.save("model.eqx", model, state)
    ```

    **Arguments:**

    - `path`: the file to write. An existing file keeps its permissions; a new
        one gets those of any new file (`0o666` less the umask). A symbolic link
        stays a link: the file it points to is written (atomically, in its own
        folder).
    - `model`: the model.
    - `state`: its `eqx.nn.State`.

    **Raises:**

    A `FileNotFoundError` if the folder of `path` does not exist, an
    `IsADirectoryError` if `path` is a folder, and a `PermissionError` if it is a
    file without write permission (which the rename would otherwise replace), each
    naming `path` and leaving it as it was. An `ImportError` naming the extra to
    install if arrays are sharded across processes and Orbax is missing.
    """
    path = _checked_call("save", path, model, state)
    # Through a symbolic link (`latest.eqx -> step100.eqx`): write its target, in
    # the target's folder, and keep the link.
    path = Path(os.path.realpath(path)) if path.is_symlink() else path
    layers = _layer_headers(model, state)
    header = {"format": _FORMAT, "version": _VERSION, "layers": layers}
    model = _without_layout(model)
    if jax.process_count() == 1:
        _write(path, header, (model, state))
        tidy(path, keep=None)
        return
    leaves = jax.tree.leaves((model, state))
    if not any(split_across_processes(x) for x in leaves):
        # Every array is whole on every process: process 0 writes the one file.
        local = jax.tree.map(local_copy, (model, state))
        on_process_zero(lambda: (_write(path, header, local), tidy(path, keep=None)))
        return
    folder = on_process_zero(lambda: _new_folder(path))
    arrays = [x for x in leaves if eqx.is_array_like(x)]
    write_arrays(path.parent, folder, arrays)
    header = {
        **header,
        "version": _SHARDED,
        "arrays": folder,
        "leaves": [describe_leaf(x) for x in arrays],
    }
    on_process_zero(lambda: (_write(path, header, None), tidy(path, keep=folder)))


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


def _checked_call(tool: str, path: Any, model: PyTree, state: Any) -> Path:
    """`path` as a `Path`, once the call's arguments are checked: a path, a state
    that holds every state entry of the model, and concrete arrays (not traced
    under `jit`). A `TypeError` or `ValueError` naming the argument otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`eqx_norm.{tool}`: `path` must be a file path (a str or "
            f"`pathlib.Path`), got {path!r}; e.g. `eqx_norm.{tool}("
            f'"model.eqx", model, state)`.'
        )
    if not isinstance(state, eqx.nn.State):
        swapped = (
            " (model and state swapped?)" if isinstance(model, eqx.nn.State) else ""
        )
        raise TypeError(
            f"`eqx_norm.{tool}`: `state` must be the model's `eqx.nn.State`, got a "
            f"{type(state).__name__}{swapped}; call `eqx_norm.{tool}(path, model, "
            "state)` with the state made with the model (`eqx.nn.make_with_state`)."
        )
    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)  # noqa: E731
    for leaf in jax.tree.leaves(model, is_leaf=is_index):
        if is_index(leaf):
            try:
                state.get(leaf)
            except KeyError:
                raise ValueError(
                    f"`eqx_norm.{tool}`: `state` does not hold the entries of this "
                    "model's stateful layers: it is the `eqx.nn.State` of another "
                    "model. Pass the state made with this model "
                    "(`eqx.nn.make_with_state`) or returned by its last step."
                ) from None
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((model, state))):  # pyright: ignore[reportAttributeAccessIssue]
        raise TypeError(
            f"`eqx_norm.{tool}` got traced arrays: it was called inside `jit` (or "
            "another transformation), where arrays have no values to "
            f"{'write' if tool == 'save' else 'replace'}. Call it outside `jit`, "
            "between steps."
        )
    return Path(path)


def _mode_for(path: Path) -> int:
    """The permissions the file at `path` should have after `save`, or an `OSError`
    naming `path` if it cannot be written there."""
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(
            f"`eqx_norm.save`: {str(path.parent)!r} is a file, not a folder, so "
            f"{str(path)!r} cannot be written in it; save to a path in a folder, "
            f"e.g. {str(path.parent.parent / path.name)!r}."
        )
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
    if version == _SHARDED and not valid_arrays_header(header):
        raise fault("the header's `arrays` or `leaves` is missing or malformed")
    return layers, version, header


def load(
    path: str | Path, model: PyTree, state: eqx.nn.State
) -> tuple[PyTree, eqx.nn.State]:
    """Load a model and state saved by [`eqx_norm.save`][] into the structure of
    `model` and `state`, after checking that every BatchNorm layer matches.

    Nothing is modified in place: the given `model` and `state` only describe the
    structure, and on any error they are as they were.

    ```python
    eqx_norm.save("model.eqx", model, state)
    # Into a model and state of the same structure (e.g. freshly made):
    model, state = eqx_norm.load("model.eqx", model, state)
    ```

    **Arguments:**

    - `path`: the file written by `eqx_norm.save`.
    - `model`, `state`: a model and state of the same structure (e.g. freshly made
        with `eqx.nn.make_with_state`). On several hosts, call it on every process;
        each array comes back with the sharding of the one it replaces (whatever
        the sharding it was saved with: on one device, replicated over a mesh of
        one process's devices or split across processes), so that a model placed
        on the mesh comes back on it.

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
    path = _checked_call("load", path, model, state)
    with open(path, "rb") as f:
        line = f.readline()
        layers, version, header = _read_header(path, line)
        saved = {layer["path"]: layer for layer in layers}
        expected = {layer["path"]: layer for layer in _layer_headers(model, state)}
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
        like = (_without_layout(model), state)
        if version == _SHARDED:
            return _with_layout(read_arrays(path, header, like), model)
        try:
            loaded = eqx.tree_deserialise_leaves(f, like)
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"{path}: does not match this model's structure: {e}"
            ) from e
        if f.read(1):
            raise ValueError(
                f"{path}: has bytes after its last leaf, so it is not one "
                "checkpoint of this model (appended to, or two files joined); "
                "save the model again, or restore the file from a copy."
            )
    return _with_layout(jax.tree.map(place_like, loaded, like), model)


class _NotSaved:
    """Stands in a checkpoint's tree for a BatchNorm's `compute_channels_last`: a
    layout of the computation, not of the model, which the file does not hold (so
    that checkpoints from before it was a field still load); `load` keeps the
    given model's."""


def _without_layout(model: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: (
            eqx.tree_at(lambda bn: bn.compute_channels_last, x, _NotSaved())
            if is_batch_norm(x)
            else x
        ),
        model,
        is_leaf=is_batch_norm,
    )


def _with_layout(loaded: tuple[PyTree, eqx.nn.State], model: PyTree):
    """The loaded model with each BatchNorm's layout flag taken from `model`."""
    flags = iter(bn.compute_channels_last for _, bn in batch_norms(model))
    restored = jax.tree.map(
        lambda x: (
            eqx.tree_at(lambda bn: bn.compute_channels_last, x, next(flags))
            if is_batch_norm(x)
            else x
        ),
        loaded[0],
        is_leaf=is_batch_norm,
    )
    return restored, loaded[1]


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


def _new_folder(path: Path) -> str:
    """A new name for the arrays of the checkpoint at `path`, after checking that
    `path` can be written."""
    _mode_for(path)
    return f"{path.name}.{secrets.token_hex(8)}.orbax"
