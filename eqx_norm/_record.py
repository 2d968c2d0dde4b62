"""One training-mode forward pass that reports every BatchNorm layer's batch
statistics: what [`eqx_norm.recalibrate`][] and [`eqx_norm.diagnose`][] measure."""

from collections.abc import Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._approaches import Approach, BatchStats
from ._batch_norm import BatchNorm, OneValuePerChannelError
from ._state import copy_state
from ._walk import batch_norms, is_batch_norm

# The recordings in progress, innermost last: while a recording forward pass is
# traced, each `_Report` puts its layer's batch statistics into the last one.
_RECORDINGS: list[dict[int, BatchStats]] = []


class _Report(Approach):
    """Normalises exactly as `inner` does, and reports the batch statistics it was
    given, as those of layer number `index`, to the recording in progress."""

    inner: Approach = eqx.field(static=True)
    index: int = eqx.field(static=True)

    @property
    def needs_batch_variance(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.needs_batch_variance

    def train(self, batch, running, momentum, eps):
        _RECORDINGS[-1][self.index] = batch
        return self.inner.train(batch, running, momentum, eps)

    def infer(self, running, momentum):
        return self.inner.infer(running, momentum)


def _names(axis_name: Hashable | Sequence[Hashable]) -> tuple[Hashable, ...]:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


@eqx.filter_jit
def _forward(model, state, x, names):
    def call(xi, state):
        _RECORDINGS.append({})
        try:
            model(xi, copy_state(state))
        finally:
            recorded = _RECORDINGS.pop()
        return {i: (b.mean, b.var, jnp.asarray(b.n)) for i, b in recorded.items()}

    # One vmap per axis name, the outer ones of size 1: every layer reduces over
    # all of them, as it would under the user's own vmap or shard_map.
    f = jax.vmap(call, in_axes=(0, None), out_axes=None, axis_name=names[-1])
    for name in reversed(names[:-1]):
        f = jax.vmap(f, in_axes=(0, None), out_axes=None, axis_name=name)
    return f(x.reshape((1,) * (len(names) - 1) + x.shape), state)


def record_batch_statistics(
    model: PyTree, state: eqx.nn.State, x: Any, tool: str, inner: Approach | None
) -> list[BatchStats | None]:
    """Every BatchNorm layer's statistics of the batch `x`, in `batch_norms` order:
    `None` where they were not finite, or where the layer was not called.

    Each layer normalises as `inner` does (`None`: its own approach), so that later
    layers see what they would in that mode. The state is not changed.
    """
    layers = batch_norms(model)
    names = {_names(bn.axis_name) for _, bn in layers}
    if len(names) != 1:
        raise ValueError(
            f"`{tool}` calls the model under one set of vmapped axes, but its "
            "BatchNorm layers reduce over different axis names "
            f"{sorted(names, key=str)}. Build the model with one `axis_name` for "
            "every BatchNorm layer."
        )
    index = {id(bn): i for i, (_, bn) in enumerate(layers)}

    def report(x):
        if not isinstance(x, BatchNorm):
            return x
        return x.with_approach(_Report(inner or x.approach, index[id(x)]))

    recording = jtu.tree_map(report, model, is_leaf=is_batch_norm)
    recording = eqx.nn.inference_mode(recording, False)
    try:
        recorded = _forward(recording, copy_state(state), x, names.pop())
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
    out: list[BatchStats | None] = []
    for i, (path, _) in enumerate(layers):
        if i not in recorded:
            raise ValueError(
                f"`{tool}`: the BatchNorm layer at {path!r} was not called when the "
                "model ran on the batch, so it has no statistics to measure."
            )
        mean, var, n = recorded[i]
        finite = np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
        out.append(BatchStats(mean, var, int(n)) if finite else None)
    return out


def first_input(batch: Any) -> Any:
    """The model's input in a batch that may be `(x, labels, ...)`."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch
