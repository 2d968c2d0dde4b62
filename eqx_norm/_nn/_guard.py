"""The guard on the running statistics: an update from a batch, or to statistics,
that is not finite (or a negative variance) leaves the state as it was."""

import functools

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from ._approach import RunningStats


def keep_where(keep: Array, new: RunningStats, old: RunningStats) -> RunningStats:
    return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)


def guarded(batch, new: RunningStats, old: RunningStats) -> RunningStats:
    """`new`, unless this batch's or the new statistics are not finite, or the new
    variance is negative: then `old`, so one bad batch (or an approach, built-in or
    a user's, that overflows) cannot poison inference.

    The two conditions are reduced over the channels together, in one variadic
    reduction: XLA:CPU splits a single reduction over more than 32 channels into a
    windowed one and a final one (two kernels, and the per-channel check a third),
    but leaves a variadic reduction whole, with the check fused into it."""
    stats = (batch.mean, batch.var, new.mean, new.var)
    finite = functools.reduce(jnp.logical_and, map(jnp.isfinite, stats))
    extra = [
        a for a in jax.tree.leaves(new.extra) if jnp.issubdtype(a.dtype, jnp.floating)
    ]
    if extra:  # what an approach keeps besides (`Tracking`'s candidates), whole
        finite = finite & functools.reduce(
            jnp.logical_and, [jnp.all(jnp.isfinite(a)) for a in extra]
        )
    finite, non_negative = lax.reduce(
        (finite, new.var >= 0), (True, True), _both, tuple(range(finite.ndim))
    )
    return keep_where(finite & non_negative, new, old)


def _both(a, b):
    return a[0] & b[0], a[1] & b[1]
