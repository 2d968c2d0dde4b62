import json
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import PyTree

from ._tools import batch_norms

_FORMAT = "eqx_norm-checkpoint"
_VERSION = 1


def _describe(model: PyTree, state: eqx.nn.State) -> list[dict[str, Any]]:
    out = []
    for path, bn in batch_norms(model):
        mean, _ = bn.statistics(state)
        out.append(
            {
                "path": path,
                "approach": repr(bn.approach),
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

    **Arguments:**

    - `path`: the file to write.
    - `model`: the model.
    - `state`: its `eqx.nn.State`.
    """
    header = {"format": _FORMAT, "version": _VERSION, "layers": _describe(model, state)}
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        eqx.tree_serialise_leaves(f, (model, state))


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

    A `ValueError` naming the layer and the mismatch if a BatchNorm layer differs in
    approach, channel count or dtype (or the file is not such a checkpoint).
    """
    with open(path, "rb") as f:
        line = f.readline()
        try:
            header = json.loads(line)
            assert header["format"] == _FORMAT
        except (ValueError, KeyError, AssertionError, TypeError):
            raise ValueError(
                f"{path}: not a checkpoint written by `eqx_norm.save`. For a file of "
                "`eqx.tree_serialise_leaves`, use `eqx.tree_deserialise_leaves`."
            ) from None
        saved = {layer["path"]: layer for layer in header["layers"]}
        expected = {layer["path"]: layer for layer in _describe(model, state)}
        if saved.keys() != expected.keys():
            raise ValueError(
                f"{path}: the saved model has BatchNorm layers at {sorted(saved)}, "
                f"this model at {sorted(expected)}."
            )
        for name, want in expected.items():
            got = saved[name]
            for key in (
                "approach",
                "input_size",
                "statistics_dtype",
                "parameter_dtype",
            ):
                if got[key] != want[key]:
                    hint = (
                        " Switch this model with `eqx_norm.set_approach(model, ...)` "
                        "before loading, or after."
                        if key == "approach"
                        else " Build the model with the saved settings."
                    )
                    raise ValueError(
                        f"{path}: the BatchNorm layer at {name!r} was saved with "
                        f"{key}={got[key]!r}, but this model has {key}={want[key]!r}."
                        + hint
                    )
        try:
            return eqx.tree_deserialise_leaves(f, (model, state))
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"{path}: does not match this model's structure: {e}"
            ) from e
