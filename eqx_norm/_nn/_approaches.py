"""The built-in statistics strategies ("approaches") of [`eqx_norm.BatchNorm`][].

Every one but `Tracking` (in `_tracking.py`) keeps the same three arrays in the
state: the per-channel mean and variance that inference uses, and a count. Because
the stored statistics *are* the inference statistics, a model can switch between
them on the same state.
"""

import types
from collections.abc import Mapping
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._approach import AbstractApproach, AbstractStoredApproach
from ._averages import debiased_ema, momentum_of, power, unbiased
from ._tracking import Tracking


class Batch(AbstractStoredApproach):
    r"""Normalise with the batch statistics; keep a zero-debiased EMA for inference.

    In training step $t$ the batch is normalised with its own mean $\mu_t$ and
    biased variance $v_t$. The running statistics are

    $$h_t = m h_{t-1} + (1-m) s_t, \quad h_0 = 0, \quad
    \text{running}_t = \frac{h_t}{1 - m^t}, \quad
    s_t = \left(\mu_t, v_t \tfrac{n}{n-1}\right)$$

    (unbiased variance, as PyTorch and Flax keep). Inference uses the running
    statistics; before any step, mean 0 and variance 1. This is the default, and what
    `eqx.nn.BatchNorm(mode="batch")` intended, without its start-up bias.
    """

    needs_batch_variance: ClassVar[bool] = True

    def train(self, batch, running, momentum, eps):
        new = debiased_ema(running, batch.mean, unbiased(batch), momentum)
        return batch.mean, batch.var, new


class EMA(AbstractStoredApproach):
    r"""Normalise a training batch with an exponential moving average that includes it
    (Equinox's original `mode="ema"`).

    $$r_1 = (\mu_1, v_1), \qquad r_t = m r_{t-1} + (1-m) (\mu_t, v_t)$$

    Training normalises with $r_t$ and inference with $r_T$. Gradients flow only
    through the $(1-m)$ share of the batch statistics: with $m$ near 1 the layer
    hardly normalises what it is given, the cause of the gradient spikes in
    Equinox issue #659. Kept for comparison and for reproducing old models.
    """

    needs_batch_variance: ClassVar[bool] = True

    def train(self, batch, running, momentum, eps):
        first = running.counter == 0
        m = momentum_of(momentum, running)
        mean = jnp.where(first, batch.mean, m * running.mean + (1 - m) * batch.mean)
        var = jnp.where(first, batch.var, m * running.var + (1 - m) * batch.var)
        return (
            mean,
            var,
            running._replace(mean=mean, var=var, counter=running.counter + 1),
        )


class AdamCorrection(AbstractStoredApproach):
    r"""Normalise with a zero-debiased EMA that includes this batch, as Adam debiases
    its moments.

    $$h_t = m h_{t-1} + (1-m)(\mu_t, v_t), \quad h_0 = 0,$$

    training normalises with $h_t / (1 - m^t)$, and inference uses
    $h_T / (1 - m^T)$. At $t = 1$ this is exactly the batch statistics.
    """

    needs_batch_variance: ClassVar[bool] = True

    def train(self, batch, running, momentum, eps):
        new = debiased_ema(running, batch.mean, batch.var, momentum)
        return new.mean, new.var, new


class SmoothStart(AbstractStoredApproach):
    r"""Normalise with the EMA plus the missing weight put on this batch.

    $$h_t = m h_{t-1} + (1-m)(\mu_t, v_t), \quad h_0 = 0,$$

    training normalises with $h_t + m^t (\mu_t, v_t)$ (the weights sum to one, and at
    $t = 1$ it is the batch statistics), and inference uses $h_T / (1 - m^T)$.
    The state stores $h_t / (1 - m^t)$.
    """

    needs_batch_variance: ClassVar[bool] = True

    def train(self, batch, running, momentum, eps):
        new = debiased_ema(running, batch.mean, batch.var, momentum)
        m = momentum_of(momentum, running)
        # h_{t-1} = (1 - m^{t-1}) R_{t-1}, so m h_{t-1} = (m - m^t) R_{t-1}; the
        # weights sum to one, and at t = 1 they are exactly 0 and 1.
        old_weight = m - power(m, new.counter)
        batch_weight = 1 - old_weight
        mean = old_weight * running.mean + batch_weight * batch.mean
        var = old_weight * running.var + batch_weight * batch.var
        return mean, var, new


class Frozen(AbstractStoredApproach):
    """Normalise with the stored statistics in training and inference alike; never
    update them. Weight and bias still learn.

    For fine-tuning a pretrained model, with any batch size (1 included): the
    correct version of calling `.eval()` on the BatchNorm layers only.
    """

    needs_batch_variance: ClassVar[bool] = False

    def train(self, batch, running, momentum, eps):
        return running.mean, running.var, running


class Running(AbstractStoredApproach):
    r"""A capped-count running mean and variance, used in training and inference
    (fastai's `RunningBatchNorm`).

    Each batch is merged into the running statistics with Chan et al.'s parallel
    Welford update, weighted by its size $n$ against the stored count $c$:

    $$\delta = \mu_t - \bar\mu, \quad
    \bar\mu' = \bar\mu + \delta \frac{n}{c + n}, \quad
    \bar v' = \frac{c \bar v + n v_t + \delta^2 c n / (c + n)}{c + n},$$

    and the count becomes $\min(c + n, \text{max\_count})$, so that old batches
    fade once `max_count` values have been seen. Training normalises with the
    merged statistics, so it works with one value per channel (batch size 1).

    **Arguments:**

    - `max_count`: the most values the running statistics stand for (default 256).
    """

    max_count: int = eqx.field(static=True, default=256)
    needs_batch_variance: ClassVar[bool] = False

    def __check_init__(self):
        if not isinstance(self.max_count, (int, np.integer)) or isinstance(
            self.max_count, bool
        ):
            raise TypeError(
                f"`max_count` must be an int, got {self.max_count!r}; for example "
                "`Running(max_count=256)`."
            )
        if not 1 <= self.max_count <= _MAX_COUNT:
            raise ValueError(
                f"`max_count` must be a whole number of values from 1 to {_MAX_COUNT} "
                f"(the int32 counter's range), got {self.max_count!r}; for example "
                "`Running(max_count=256)`."
            )

    def train(self, batch, running, momentum, eps):
        dtype = running.mean.dtype
        c = running.counter.astype(dtype)
        n = jnp.asarray(batch.n, dtype)
        # Weights below one, so that no product can overflow for finite statistics
        # (c * var can, once var is large and c is at its cap).
        old_weight = c / (c + n)
        # Not n / (c + n): at c = 0 that is n / n, which a GPU's division need not
        # round to exactly 1, and the first step must store the batch statistics.
        new_weight = 1 - old_weight
        delta = batch.mean - running.mean
        mean = running.mean + delta * new_weight
        spread = delta * jnp.sqrt(old_weight * new_weight)
        var = old_weight * running.var + new_weight * batch.var + spread * spread
        # Saturating, in int32: the counter never passes max_count, so never wraps.
        room = self.max_count - running.counter
        added = jnp.minimum(jnp.asarray(batch.n, jnp.int32), self.max_count)
        count = running.counter + jnp.minimum(added, room)
        new = running._replace(mean=mean, var=var, counter=count.astype(jnp.int32))
        return mean, var, new


_MAX_COUNT = 2**31 - 1


class Renorm(AbstractStoredApproach):
    r"""Batch Renormalization (Ioffe, 2017).

    $$y = \frac{x - \mu_B}{\sigma_B} r + d, \quad
    r = \operatorname{sg}\left(\operatorname{clip}\left(\frac{\sigma_B}{\sigma},
    \frac{1}{r_\max}, r_\max\right)\right), \quad
    d = \operatorname{sg}\left(\operatorname{clip}\left(\frac{\mu_B - \mu}{\sigma},
    -d_\max, d_\max\right)\right)$$

    with $\sigma_B = \sqrt{v_B + \varepsilon}$, $\sigma = \sqrt{\text{var} +
    \varepsilon}$ from the running statistics, and sg the stop-gradient. Before any
    step there are no running statistics, so the first step uses $r = 1, d = 0$.
    The running statistics are kept as in [`eqx_norm.Batch`][] and used by
    inference. Training returns the equivalent normalising statistics
    $\mu_B - d \sigma_B / r$ and $\sigma_B^2 / r^2 - \varepsilon$.

    **Arguments:**

    - `r_max`: the largest correction of the scale (at least 1; default 3).
    - `d_max`: the largest correction of the shift, in running standard deviations
        (at least 0; default 5).

    ??? cite

        [Batch Renormalization: Towards Reducing Minibatch Dependence in
        Batch-Normalized Models](https://arxiv.org/abs/1702.03275)

        ```bibtex
        @inproceedings{ioffe2017batch,
            title={Batch Renormalization: Towards Reducing Minibatch Dependence in
                   Batch-Normalized Models},
            author={Ioffe, Sergey},
            booktitle={Advances in Neural Information Processing Systems},
            year={2017}
        }
        ```
    """

    needs_batch_variance: ClassVar[bool] = True

    r_max: float | int = eqx.field(static=True, default=3.0)
    d_max: float | int = eqx.field(static=True, default=5.0)

    def __check_init__(self):
        for name in ("r_max", "d_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.integer, np.floating)) or (
                isinstance(value, (bool, np.bool_))
            ):
                raise TypeError(
                    f"`{name}` must be a real number, got {value!r} of type "
                    f"{type(value).__name__}; for example `Renorm(r_max=3.0, "
                    "d_max=5.0)`."
                )
        if not self.r_max >= 1:
            raise ValueError(f"`r_max` must be at least 1, got {self.r_max}.")
        if not self.d_max >= 0:
            raise ValueError(f"`d_max` must be at least 0, got {self.d_max}.")

    def train(self, batch, running, momentum, eps):
        sigma_b = jnp.sqrt(batch.var + eps)
        sigma = jnp.sqrt(running.var + eps)
        first = running.counter == 0
        r = jnp.clip(sigma_b / sigma, 1 / self.r_max, self.r_max)
        d = jnp.clip((batch.mean - running.mean) / sigma, -self.d_max, self.d_max)
        r = jax.lax.stop_gradient(jnp.where(first, 1, r))
        d = jax.lax.stop_gradient(jnp.where(first, 0, d))
        mean = batch.mean - d * sigma_b / r
        var = (batch.var + eps) / r**2 - eps
        new = debiased_ema(running, batch.mean, unbiased(batch), momentum)
        return mean, var, new


APPROACHES: Mapping[str, type[AbstractApproach]] = types.MappingProxyType(
    {
        "batch": Batch,
        "ema": EMA,
        "adam-correction": AdamCorrection,
        "smooth-start": SmoothStart,
        "frozen": Frozen,
        "running": Running,
        "renorm": Renorm,
        "tracking": Tracking,
    }
)
"""The built-in approaches: each name that `BatchNorm(approach=...)` accepts, and the
strategy class it stands for (built with its defaults). Read-only."""


def as_approach(approach: "str | AbstractApproach") -> AbstractApproach:
    """The strategy object for a string (with its defaults) or a strategy object."""
    if isinstance(approach, str):
        try:
            return APPROACHES[approach]()
        except KeyError:
            known = ", ".join(repr(k) for k in APPROACHES)
            raise ValueError(
                f"Unknown `approach={approach!r}`. Use one of {known}, or pass a "
                "strategy object such as `eqx_norm.Running(max_count=512)`."
            ) from None
    if isinstance(approach, AbstractApproach):
        return approach
    raise TypeError(
        "`approach` must be a string or an `eqx_norm.AbstractApproach` instance, got "
        f"{type(approach).__name__}. Subclass `eqx_norm.Approach` to write a strategy."
    )
