"""One training-mode forward pass whose output is every BatchNorm layer's batch
statistics: what [`eqx_norm.recalibrate`][] and [`eqx_norm.diagnose`][] measure.

The statistics travel in the state, as everything a layer computes does: each
layer's entry is made a `Recording` (see `_nn/_recording.py`), the model runs, and
the layer writes its batch statistics into the entry of the state it returns."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .._nn._approach import AbstractApproach, BatchStats
from .._nn._batch_norm import OneValuePerChannelError
from .._nn._groups import axis_names
from .._nn._recording import Recording
from .._state import copy_state
from ._walk import batch_norms, is_batch_norm


def _is_state(x: Any) -> bool:
    return isinstance(x, eqx.nn.State)


@eqx.filter_jit
def _forward(model, state, x, names, indices, tool):
    def call(xi, state):
        outputs = model(xi, state)
        leaves = jax.tree.leaves(outputs, is_leaf=_is_state)
        states = [leaf for leaf in leaves if _is_state(leaf)]
        if len(states) != 1:
            raise ValueError(
                f"`{tool}` calls the model as `model(x, state)` and reads the new "
                f"state among its outputs, but it returned {len(states)} "
                "`eqx.nn.State` objects. Pass a model that returns its new state, "
                "e.g. `(y, state)`."
            )
        return [states[0].get(index).batch for index in indices]

    # One vmap per axis name, the outer ones of size 1: every layer reduces over
    # all of them, as it would under the user's own vmap or shard_map.
    f = jax.vmap(call, in_axes=(0, None), out_axes=None, axis_name=names[-1])
    for name in reversed(names[:-1]):
        f = jax.vmap(f, in_axes=(0, None), out_axes=None, axis_name=name)
    return f(x.reshape((1,) * (len(names) - 1) + x.shape), state)


def _recording(state: eqx.nn.State, indices: list[eqx.nn.StateIndex]) -> eqx.nn.State:
    """A copy of `state` whose entries at `indices` are `Recording`s of nothing yet."""

    def empty(running):
        mean = jnp.zeros_like(running.mean)
        return Recording(running, BatchStats(mean, mean, jnp.array(-1, jnp.int32)))

    entries = [state.get(index) for index in indices]
    return eqx.tree_at(
        lambda s: [s.get(index) for index in indices],
        copy_state(state),
        [empty(running) for running in entries],
        is_leaf=lambda x: any(x is e for e in entries),
    )


def record_batch_statistics(
    model: PyTree,
    state: eqx.nn.State,
    x: Any,
    tool: str,
    inner: AbstractApproach | None,
) -> list[BatchStats | None]:
    """Every BatchNorm layer's statistics of the batch `x`, in `batch_norms` order:
    `None` where they were not finite, or where the layer was not called.

    Each layer normalises as `inner` does (`None`: its own approach), so that later
    layers see what they would in that mode. The state is not changed.
    """
    layers = batch_norms(model)
    names = {axis_names(bn.axis_name) for _, bn in layers}
    if len(names) != 1:
        raise ValueError(
            f"`{tool}` calls the model under one set of vmapped axes, but its "
            "BatchNorm layers reduce over different axis names "
            f"{sorted(names, key=str)}. Build the model with one `axis_name` for "
            "every BatchNorm layer."
        )
    # One entry per state index: a layer called twice records its last call.
    indices = list({bn.state_index.marker: bn.state_index for _, bn in layers}.values())
    if inner is not None:
        model = jax.tree.map(
            lambda x: x.with_approach(inner) if is_batch_norm(x) else x,
            model,
            is_leaf=is_batch_norm,
        )
    model = eqx.nn.inference_mode(model, False)
    try:
        recorded = _forward(
            model, _recording(state, indices), x, names.pop(), indices, tool
        )
    except OneValuePerChannelError:
        needs = (
            "normalises every batch with its own statistics, which"
            if (inner is not None)
            else "runs the model in training mode, whose approach"
        )
        raise ValueError(
            f"`{tool}` {needs} needs more than one value per channel, and a "
            "BatchNorm layer got one (batch size 1 and no spatial axes). Pass "
            "batches of at least 2 examples."
        ) from None
    by_marker = {index.marker: stats for index, stats in zip(indices, recorded)}
    out: list[BatchStats | None] = []
    for path, bn in layers:
        mean, var, n = by_marker[bn.state_index.marker]
        if int(n) < 0:
            raise ValueError(
                f"`{tool}`: the BatchNorm layer at {path!r} was not called when the "
                "model ran on the batch, so it has no statistics to measure."
            )
        finite = np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
        out.append(BatchStats(mean, var, int(n)) if finite else None)
    return out


def first_input(batch: Any) -> Any:
    """The model's input in a batch that may be `(x, labels, ...)`."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch
