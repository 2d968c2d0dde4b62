import dataclasses
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import PyTree

from ._approaches import APPROACHES
from ._walk import batch_norms

_FORMAT = "eqx_norm-checkpoint"
_VERSION = 2
_READS = (1, 2)  # version 1 described approaches by their repr


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

    **Arguments:**

    - `path`: the file to write. An existing file keeps its permissions; a new
        one gets those of any new file (`0o666` less the umask).
    - `model`: the model.
    - `state`: its `eqx.nn.State`.

    **Raises:**

    A `FileNotFoundError` if the folder of `path` does not exist, an
    `IsADirectoryError` if `path` is a folder, and a `PermissionError` if it is a
    file without write permission (which the rename would otherwise replace), each
    naming `path` and leaving it as it was.
    """
    path = Path(path)
    header = {"format": _FORMAT, "version": _VERSION, "layers": _describe(model, state)}
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            eqx.tree_serialise_leaves(f, (model, state))
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


def _read_header(path: Path, line: bytes) -> tuple[list[dict[str, Any]], int]:
    """The layers of a checkpoint's header, or a `ValueError` naming the fault."""

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
    return layers, version


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
        with `eqx.nn.make_with_state`).

    **Returns:**

    A 2-tuple `(model, state)` holding the saved values.

    **Raises:**

    A `ValueError` naming the file and the fault if it is not a checkpoint of this
    format and version (a malformed or truncated header, or leaves that do not
    match), or naming the layer and the mismatch if a BatchNorm layer differs in
    approach (named as it is written: `"batch"`, `eqx_norm.Renorm(r_max=4)`, or a
    class of your own by its name, with the `eqx_norm.set_approach` call that makes
    the model match), channel count or dtype.
    """
    path = Path(path)
    with open(path, "rb") as f:
        line = f.readline()
        layers, version = _read_header(path, line)
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
        try:
            return eqx.tree_deserialise_leaves(f, (model, state))
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"{path}: does not match this model's structure: {e}"
            ) from e


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
