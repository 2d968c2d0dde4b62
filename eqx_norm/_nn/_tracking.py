"""`approach="tracking"`: running statistics that keep up with the weights."""

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._approach import AbstractApproach, RunningStats
from ._averages import power, unbiased


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


class Tracking(AbstractApproach):
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

    needs_batch_variance: ClassVar[bool] = True

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
        k = len(self.momenta)
        extra = TrackingStats(
            means=jnp.zeros((k, input_size), dtype),
            vars=jnp.ones((k, input_size), dtype),
            scores=jnp.zeros((k,), dtype),
        )
        return RunningStats(
            mean=jnp.zeros((input_size,), dtype),
            var=jnp.ones((input_size,), dtype),
            counter=jnp.array(0, jnp.int32),
            extra=extra,
        )

    def infer(self, running, momentum):
        return running.mean, running.var

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
        mean, var = batch.mean, unbiased(batch)
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
        w_score = jnp.where(first_score, 1, (1 - beta) / (1 - power(beta, t - 1)))
        scores = jnp.where(t >= 2, (1 - w_score) * old.scores + w_score * errors, 0)
        # Every candidate takes this batch in.
        m = jnp.asarray(self.momenta, dtype)[:, None]
        weight = jnp.where(t == 1, 1, (1 - m) / (1 - power(m, t)))
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
