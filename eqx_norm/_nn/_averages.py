"""The arithmetic the built-in approaches share: zero-debiased moving averages kept
already debiased, and the unbiased batch variance."""

import jax.numpy as jnp
from jaxtyping import Array

from ._approach import BatchStats, RunningStats


def debiased_ema(
    running: RunningStats, mean: Array, var: Array, momentum: float
) -> RunningStats:
    """A zero-debiased exponential moving average, stored already debiased.

    With $h_t = m h_{t-1} + (1-m) s_t$, $h_0 = 0$, the debiased value
    $R_t = h_t / (1 - m^t)$ satisfies
    $R_t = (1 - w_t) R_{t-1} + w_t s_t$ with $w_t = \\frac{1 - m}{1 - m^t}$, so
    storing $R$ and $t$ is the same as storing $h$ and $t$, and $R$ is what inference
    uses directly. The weight is computed wholly in the statistics' dtype, and
    $w_1 = 1$ is set rather than divided out (a GPU's float32 division need not give
    exactly 1 for $x / x$), so the first step stores the batch statistics
    themselves; the two weights are non-negative, so a non-negative variance stays
    non-negative.
    """
    t = running.counter + 1
    m = momentum_of(momentum, running)
    weight = jnp.where(t == 1, 1, (1 - m) / (1 - power(m, t)))
    return running._replace(
        mean=(1 - weight) * running.mean + weight * mean,
        var=(1 - weight) * running.var + weight * var,
        counter=t,
    )


def power(m: Array, t: Array) -> Array:
    """$m^t$ for an integer count $t \\geq 1$, exactly $m$ at $t = 1$ on every
    backend (a floating-point `pow` need not be exact there)."""
    return jnp.where(t == 1, m, m ** t.astype(m.dtype))


def momentum_of(momentum: float, running: RunningStats) -> Array:
    """The momentum in the statistics' dtype. Every weight is computed from it, never
    from the Python float, so that the weights of a formula sum to one exactly as
    the dtype rounds them (a float64 `1 - m` beside a float32 `m` does not)."""
    return jnp.asarray(momentum, running.mean.dtype)


def unbiased(batch: BatchStats) -> Array:
    if isinstance(batch.n, int):
        return batch.var * (batch.n / (batch.n - 1))
    n = batch.n.astype(batch.var.dtype)
    return batch.var * (n / (n - 1))
