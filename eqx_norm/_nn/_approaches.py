"""Statistics strategies ("approaches") for [`eqx_norm.BatchNorm`][].

Every built-in approach keeps the same three arrays in the state: the per-channel
mean and variance that inference uses, and a count. Because the stored statistics
*are* the inference statistics, a model can switch approach on the same state.
"""

import abc
import types
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


class BatchStats(NamedTuple):
    """The statistics of one training batch, per channel.

    **Attributes:**

    - `mean`: the batch mean, shape `(input_size,)`, float32 or wider.
    - `var`: the biased (population) batch variance, same shape and dtype.
    - `n`: the number of values per channel that the statistics were taken over
        (batch size times the spatial size): a static Python `int`, or an int32
        scalar array when a `mask` selects the values (then known only at run
        time). With ghost batches, the number in one group.
    """

    mean: Float[Array, " channels"]
    var: Float[Array, " channels"]
    n: int | Int[Array, ""]


class RunningStats(NamedTuple):
    """The running statistics of one layer, as kept in `eqx.nn.State`.

    **Attributes:**

    - `mean`: the per-channel mean that inference uses, shape `(input_size,)`.
    - `var`: the per-channel variance that inference uses, same shape.
    - `counter`: an int32 scalar: how many training steps have updated the statistics
        (for the `running` approach: how many values, capped at `max_count`).
    - `extra`: what else an approach keeps, or `None` (every built-in approach but
        [`eqx_norm.Tracking`][], whose candidates are a [`eqx_norm.TrackingStats`][]).
        An approach updates a state with `running._replace(...)`, so that what it
        does not use passes through unchanged.
    """

    mean: Float[Array, " channels"]
    var: Float[Array, " channels"]
    counter: Int[Array, ""]
    extra: Any = None


class Approach(eqx.Module):
    """The base class of a statistics strategy: how a training batch is normalised,
    how the running statistics evolve, and what inference uses.

    A strategy is a small object with three methods. Subclass it to write your own;
    the layer needs nothing else:

    ```python
    class HalfAndHalf(eqx_norm.Approach):
        # Normalise with the average of batch and running statistics.
        def train(self, batch, running, momentum, eps):
            mean = 0.5 * (batch.mean + running.mean)
            var = 0.5 * (batch.var + running.var)
            new = eqx_norm.RunningStats(
                momentum * running.mean + (1 - momentum) * batch.mean,
                momentum * running.var + (1 - momentum) * batch.var,
                running.counter + 1,
            )
            return mean, var, new

    bn = eqx_norm.BatchNorm(8, "batch", approach=HalfAndHalf())
    ```

    Hyperparameters of a strategy should be `eqx.field(static=True)`.

    `momentum` and `eps` belong to the layer, not the strategy, and are passed to
    every `train`: a model switched to another approach and back (by
    [`eqx_norm.set_approach`][] or [`eqx_norm.freeze`][]) keeps them. A strategy uses
    what it needs and ignores the rest. `init` and `infer` have defaults that every
    built-in strategy shares (the stored statistics are the inference statistics);
    override them for a strategy whose inference statistics are derived from what it
    stores.
    """

    needs_batch_variance: ClassVar[bool] = True
    """Whether training needs a batch variance, i.e. more than one value per channel."""

    def init(self, input_size: int, dtype) -> RunningStats:
        """The running statistics before any training step.

        **Arguments:**

        - `input_size`: the number of channels.
        - `dtype`: the floating dtype of the statistics (float32 or wider).

        **Returns:**

        A [`eqx_norm.RunningStats`][]: mean 0, variance 1, counter 0, so that inference
        before any training step is the identity (before the affine transform).
        """
        return RunningStats(
            mean=jnp.zeros((input_size,), dtype),
            var=jnp.ones((input_size,), dtype),
            counter=jnp.array(0, jnp.int32),
        )

    @abc.abstractmethod
    def train(
        self, batch: BatchStats, running: RunningStats, momentum: float, eps: float
    ) -> tuple[Float[Array, " channels"], Float[Array, " channels"], RunningStats]:
        """One training step.

        **Arguments:**

        - `batch`: this batch's [`eqx_norm.BatchStats`][]. Its `mean` and `var` carry
            gradients: whatever share of them the returned statistics contain is
            what gradients flow through.
        - `running`: the running statistics before this step.
        - `momentum`: the layer's momentum (the weight of the old value).
        - `eps`: the layer's eps; the output is `(x - mean) / sqrt(var + eps)`.

        **Returns:**

        A 3-tuple `(mean, var, new_running)`: the statistics that normalise this
        batch, and the running statistics after this step.
        """

    def infer(
        self, running: RunningStats, momentum: float
    ) -> tuple[Float[Array, " channels"], Float[Array, " channels"]]:
        """The statistics inference uses, from the running statistics.

        **Arguments:**

        - `running`: the running statistics.
        - `momentum`: the layer's momentum.

        **Returns:**

        A 2-tuple `(mean, var)`. The default returns the stored mean and variance.
        """
        return running.mean, running.var

    def with_statistics(
        self,
        running: RunningStats,
        mean: Float[Array, " channels"],
        var: Float[Array, " channels"],
        counter: Int[Array, ""],
    ) -> RunningStats:
        """The running statistics with the statistics that inference uses replaced:
        what [`eqx_norm.BatchNorm.set_statistics`][], [`eqx_norm.recalibrate`][] and
        [`eqx_norm.match_state`][] store.

        **Arguments:**

        - `running`: the running statistics now, of this approach's structure.
        - `mean`, `var`: the statistics inference is to use.
        - `counter`: the step counter to store.

        **Returns:**

        The new [`eqx_norm.RunningStats`][]. The default replaces `mean`, `var` and
        `counter` and keeps `extra`; override it for a strategy that keeps more.
        """
        return running._replace(mean=mean, var=var, counter=counter)


def _debiased_ema(
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
    m = _momentum(momentum, running)
    weight = jnp.where(t == 1, 1, (1 - m) / (1 - _power(m, t)))
    return running._replace(
        mean=(1 - weight) * running.mean + weight * mean,
        var=(1 - weight) * running.var + weight * var,
        counter=t,
    )


def _power(m: Array, t: Array) -> Array:
    """$m^t$ for an integer count $t \\geq 1$, exactly $m$ at $t = 1$ on every
    backend (a floating-point `pow` need not be exact there)."""
    return jnp.where(t == 1, m, m ** t.astype(m.dtype))


def _momentum(momentum: float, running: RunningStats) -> Array:
    """The momentum in the statistics' dtype. Every weight is computed from it, never
    from the Python float, so that the weights of a formula sum to one exactly as
    the dtype rounds them (a float64 `1 - m` beside a float32 `m` does not)."""
    return jnp.asarray(momentum, running.mean.dtype)


def _unbiased(batch: BatchStats) -> Array:
    if isinstance(batch.n, int):
        return batch.var * (batch.n / (batch.n - 1))
    n = batch.n.astype(batch.var.dtype)
    return batch.var * (n / (n - 1))


class Batch(Approach):
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

    def train(self, batch, running, momentum, eps):
        new = _debiased_ema(running, batch.mean, _unbiased(batch), momentum)
        return batch.mean, batch.var, new


class EMA(Approach):
    r"""Normalise a training batch with an exponential moving average that includes it
    (Equinox's original `mode="ema"`).

    $$r_1 = (\mu_1, v_1), \qquad r_t = m r_{t-1} + (1-m) (\mu_t, v_t)$$

    Training normalises with $r_t$ and inference with $r_T$. Gradients flow only
    through the $(1-m)$ share of the batch statistics: with $m$ near 1 the layer
    hardly normalises what it is given, the cause of the gradient spikes in
    Equinox issue #659. Kept for comparison and for reproducing old models.
    """

    def train(self, batch, running, momentum, eps):
        first = running.counter == 0
        m = _momentum(momentum, running)
        mean = jnp.where(first, batch.mean, m * running.mean + (1 - m) * batch.mean)
        var = jnp.where(first, batch.var, m * running.var + (1 - m) * batch.var)
        return (
            mean,
            var,
            running._replace(mean=mean, var=var, counter=running.counter + 1),
        )


class AdamCorrection(Approach):
    r"""Normalise with a zero-debiased EMA that includes this batch, as Adam debiases
    its moments.

    $$h_t = m h_{t-1} + (1-m)(\mu_t, v_t), \quad h_0 = 0,$$

    training normalises with $h_t / (1 - m^t)$, and inference uses
    $h_T / (1 - m^T)$. At $t = 1$ this is exactly the batch statistics.
    """

    def train(self, batch, running, momentum, eps):
        new = _debiased_ema(running, batch.mean, batch.var, momentum)
        return new.mean, new.var, new


class SmoothStart(Approach):
    r"""Normalise with the EMA plus the missing weight put on this batch.

    $$h_t = m h_{t-1} + (1-m)(\mu_t, v_t), \quad h_0 = 0,$$

    training normalises with $h_t + m^t (\mu_t, v_t)$ (the weights sum to one, and at
    $t = 1$ it is the batch statistics), and inference uses $h_T / (1 - m^T)$.
    The state stores $h_t / (1 - m^t)$.
    """

    def train(self, batch, running, momentum, eps):
        new = _debiased_ema(running, batch.mean, batch.var, momentum)
        m = _momentum(momentum, running)
        # h_{t-1} = (1 - m^{t-1}) R_{t-1}, so m h_{t-1} = (m - m^t) R_{t-1}; the
        # weights sum to one, and at t = 1 they are exactly 0 and 1.
        old_weight = m - _power(m, new.counter)
        batch_weight = 1 - old_weight
        mean = old_weight * running.mean + batch_weight * batch.mean
        var = old_weight * running.var + batch_weight * batch.var
        return mean, var, new


class Frozen(Approach):
    """Normalise with the stored statistics in training and inference alike; never
    update them. Weight and bias still learn.

    For fine-tuning a pretrained model, with any batch size (1 included): the
    correct version of calling `.eval()` on the BatchNorm layers only.
    """

    needs_batch_variance: ClassVar[bool] = False

    def train(self, batch, running, momentum, eps):
        return running.mean, running.var, running


class Running(Approach):
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


class Renorm(Approach):
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
        new = _debiased_ema(running, batch.mean, _unbiased(batch), momentum)
        return mean, var, new


class TrackingStats(NamedTuple):
    """What [`eqx_norm.Tracking`][] keeps besides the inference statistics: its
    candidate running statistics and how well each has predicted the batches.

    **Attributes:**

    - `means`, `vars`: the candidates' statistics, shape `(candidates, channels)`:
        zero-debiased moving averages of the batch mean and unbiased variance, one
        per momentum of `Tracking.momenta`.
    - `scores`: shape `(candidates,)`: each candidate's moving average of its
        one-step-ahead prediction error (lower is better).
    """

    means: Float[Array, "candidates channels"]
    vars: Float[Array, "candidates channels"]
    scores: Float[Array, " candidates"]


class Tracking(Approach):
    r"""Normalise with the batch statistics, as [`eqx_norm.Batch`][] does; keep
    running statistics that keep up with the weights: a long average while the
    weights are still, a short one while they move.

    A moving average of past batches lags weights that still move (a constant or
    high learning rate, evaluation during training, a short fine-tuning run), and
    inference then normalises with statistics of weights that are gone. No fixed
    momentum serves both a still and a moving model, so this approach keeps a few
    averages at once and lets the data choose between them, as exponential
    smoothing chooses its smoothing constant in forecasting: by its one-step-ahead
    prediction error.

    With $s_t = (\mu_t, v_t \tfrac{n}{n-1})$ this batch's mean and unbiased
    variance, it keeps one zero-debiased moving average per momentum $m_k$ of
    `momenta`,

    $$c_{k,t} = (1 - w_{k,t})\, c_{k,t-1} + w_{k,t}\, s_t, \qquad
    w_{k,t} = \frac{1 - m_k}{1 - m_k^t},$$

    and scores each by how well it predicted this batch before seeing it, with
    $u = \sigma^2_{t-1} + \varepsilon$ per channel, where $\sigma^2_{t-1}$ is the
    variance inference used before this step:

    $$e_{k,t} = \frac{1}{C} \sum_{\text{channels}} \left(
    \frac{(\mu_t - c^\mu_{k,t-1})^2}{u} +
    \frac{(v_t \tfrac{n}{n-1} - c^v_{k,t-1})^2}{2u^2} \right)$$

    (twice the Kullback-Leibler divergence, to second order, between the normal
    distribution the candidate would normalise with and this batch's, so that
    every channel counts without units; the scale is the steady inference variance,
    not this batch's, which is as noisy as the errors it would scale), averaged
    over the channels of the layer so that the choice does not follow one
    channel's noise. A candidate's score
    $S_{k,t}$ is the zero-debiased moving average of $e_{k,t}$ with momentum
    `window` (from the second step on), and inference uses the candidate with the
    lowest score, $c_{k^*,t}$ with $k^* = \arg\min_k S_{k,t}$. While the weights
    move, the short averages predict the next batch best; once they settle, noise
    dominates the errors and the long averages win. The state stores the chosen
    candidate's statistics as the inference statistics, so
    `bn.statistics(state)` and [`eqx_norm.fold`][] read them as for any approach,
    and the candidates in `extra` (a [`eqx_norm.TrackingStats`][]). The layer's
    `momentum` is not used.

    Training is exactly that of `"batch"` (the same normalisation and gradients;
    the batch's statistics are only taken about another shift, a float rounding),
    with every option of the layer. A model switched to `"tracking"` from another
    approach needs the candidates in its state: `state =
    eqx_norm.match_state(model, state)` after [`eqx_norm.set_approach`][] adds
    them, starting every candidate from the current statistics.
    [`eqx_norm.recalibrate`][] and `set_statistics` set every candidate to the
    statistics they store.

    **Arguments:**

    - `momenta`: the candidates' momenta, each in [0, 1), none twice (default
        `(0.0, 0.5, 0.8, 0.9, 0.97, 0.995)`: from this batch alone to an average
        over about 200 steps).
    - `window`: the momentum of the scores' moving average, in [0, 1) (default
        0.95: about the last 20 steps decide).
    """

    momenta: tuple[float, ...] = eqx.field(
        static=True, default=(0.0, 0.5, 0.8, 0.9, 0.97, 0.995)
    )
    window: float = eqx.field(static=True, default=0.95)

    def __check_init__(self):
        momenta = self.momenta
        if not isinstance(momenta, tuple) or not momenta:
            raise TypeError(
                f"`momenta` must be a non-empty tuple of floats, got {momenta!r}; "
                "for example `Tracking(momenta=(0.0, 0.9, 0.99))`."
            )
        for m in (*momenta, self.window):
            name = "window" if m is self.window else "momenta"
            if not isinstance(m, (int, float, np.integer, np.floating)) or isinstance(
                m, (bool, np.bool_)
            ):
                raise TypeError(
                    f"`{name}` must hold real numbers, got {m!r}; for example "
                    "`Tracking(momenta=(0.0, 0.9, 0.99), window=0.95)`."
                )
            if not 0 <= m < 1 or not np.float32(m) < 1:
                raise ValueError(
                    f"`{name}` must be in [0, 1) (below 1 in float32), got {m!r}; "
                    "for example `Tracking(momenta=(0.0, 0.9, 0.99), window=0.95)`."
                )
        if len(set(momenta)) != len(momenta):
            raise ValueError(f"`momenta` holds a momentum twice: {momenta!r}.")

    def init(self, input_size, dtype):
        base = super().init(input_size, dtype)
        k = len(self.momenta)
        extra = TrackingStats(
            means=jnp.zeros((k, input_size), dtype),
            vars=jnp.ones((k, input_size), dtype),
            scores=jnp.zeros((k,), dtype),
        )
        return base._replace(extra=extra)

    def train(self, batch, running, momentum, eps):
        old = running.extra
        if not isinstance(old, TrackingStats):
            raise ValueError(
                "`eqx_norm.BatchNorm(approach=eqx_norm.Tracking())` keeps candidate "
                "statistics in the state, and this state was made for another "
                "approach. After switching a model to it, add them: `state = "
                "eqx_norm.match_state(model, state)`."
            )
        dtype = running.mean.dtype
        t = running.counter + 1
        mean, var = batch.mean, _unbiased(batch)
        # How well each candidate predicted this batch (before seeing it), in units
        # of the variance inference used until now: steady, where this batch's own
        # variance is as noisy as the errors it would scale.
        u = running.var + jnp.asarray(eps, dtype)
        u = jnp.where(u > 0, u, 1)
        errors = jnp.mean(
            (mean - old.means) ** 2 / u + (var - old.vars) ** 2 / (2 * u * u), axis=1
        )
        beta = jnp.asarray(self.window, dtype)
        first_score = t == 2  # the first step has nothing to predict from
        w_score = jnp.where(first_score, 1, (1 - beta) / (1 - _power(beta, t - 1)))
        scores = jnp.where(t >= 2, (1 - w_score) * old.scores + w_score * errors, 0)
        # Every candidate takes this batch in.
        m = jnp.asarray(self.momenta, dtype)[:, None]
        weight = jnp.where(t == 1, 1, (1 - m) / (1 - _power(m, t)))
        means = (1 - weight) * old.means + weight * mean
        vars_ = (1 - weight) * old.vars + weight * var
        best = jnp.argmin(scores)
        new = running._replace(
            mean=means[best],
            var=vars_[best],
            counter=t,
            extra=TrackingStats(means, vars_, scores.astype(dtype)),
        )
        return batch.mean, batch.var, new

    def with_statistics(self, running, mean, var, counter):
        k = len(self.momenta)
        extra = TrackingStats(
            means=jnp.broadcast_to(mean, (k, mean.shape[0])),
            vars=jnp.broadcast_to(var, (k, var.shape[0])),
            scores=jnp.zeros((k,), mean.dtype),
        )
        return running._replace(mean=mean, var=var, counter=counter, extra=extra)


APPROACHES: Mapping[str, type[Approach]] = types.MappingProxyType(
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


def as_approach(approach: "str | Approach") -> Approach:
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
    if isinstance(approach, Approach):
        return approach
    raise TypeError(
        "`approach` must be a string or an `eqx_norm.Approach` instance, got "
        f"{type(approach).__name__}. Subclass `eqx_norm.Approach` to write a strategy."
    )
