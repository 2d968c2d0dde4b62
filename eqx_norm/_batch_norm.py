import functools
import math
from collections.abc import Hashable, Sequence

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Float, PRNGKeyArray

from ._approaches import APPROACHES, Approach, BatchStats, RunningStats, as_approach
from ._kernels import affine, affine_formula, local_moments


def _axis_size(axis_name: Hashable | Sequence[Hashable]) -> int:
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    size = 1
    for name in names:
        try:
            size *= lax.axis_size(name)
        except NameError:
            raise NameError(
                f"`eqx_norm.BatchNorm(axis_name={axis_name!r})` found no mapped axis "
                f"named {name!r}. Call the model inside `jax.vmap(..., axis_name="
                f"{name!r})` (or `shard_map` over a mesh axis of that name), e.g. "
                "`jax.vmap(model, in_axes=(0, None), out_axes=(0, None), "
                f"axis_name={name!r})(x, state)`."
            ) from None
    return size


class OneValuePerChannelError(ValueError):
    """A training batch with one value per channel, in an approach that needs a
    batch variance (raised at trace time)."""


def _real_scalar(name: str, value) -> float:
    """`value` as a Python float, or a `TypeError` naming the argument."""
    try:
        if np.ndim(value) != 0 or isinstance(value, (bool, np.bool_)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a real number, got {value!r} of type "
            f"{type(value).__name__}."
        ) from None


class BatchNorm(eqx.nn.StatefulLayer):
    r"""Batch normalisation with a choice of how running statistics are kept and used.

    For an input with $C$ channels, each channel $i$ is normalised as

    $$y_i = \frac{x_i - \mu_i}{\sqrt{\sigma^2_i + \varepsilon}} \gamma_i + \beta_i$$

    where the statistics $(\mu, \sigma^2)$ come from the `approach`: in training a
    mix of this batch's statistics (over the batch and all spatial axes) and the
    running statistics, in inference the running statistics alone. The table of
    approaches:

    | `approach` | training normalises with | inference uses |
    |---|---|---|
    | `"batch"` (default) | the batch statistics | debiased EMA, unbiased variance |
    | `"ema"` | EMA including this batch | the EMA |
    | `"adam-correction"` | debiased EMA including this batch | the same |
    | `"smooth-start"` | EMA plus $m^t$ times this batch | debiased EMA |
    | `"frozen"` | the stored statistics, never updated | the same |
    | `"running"` | capped-count running statistics | the same |
    | `"renorm"` | Batch Renormalization | debiased EMA |

    See [`eqx_norm.Batch`][], [`eqx_norm.EMA`][], [`eqx_norm.AdamCorrection`][],
    [`eqx_norm.SmoothStart`][], [`eqx_norm.Frozen`][], [`eqx_norm.Running`][] and
    [`eqx_norm.Renorm`][] for the exact formulas, and [`eqx_norm.Approach`][] to write
    your own.

    All statistics live in an `eqx.nn.State` as a [`eqx_norm.RunningStats`][]
    (mean and variance as inference uses them, and a count), the same arrays for
    every built-in approach, so one model can switch approach on the same state.
    They are kept in float32 (or `dtype`, if wider) whatever the input's dtype; the
    output has the input's dtype.

    The batch mean and second moment are reduced across `axis_name` by two
    independent `psum`s, which XLA combines into one all-reduce. So that large
    offsets do not cancel in $E[x^2] - E[x]^2$, the input is first shifted by the
    current inference mean (a constant for the gradient); the precision this gives,
    and that of the first step (shifted by 0), is set out on the documentation's
    "Precision" page.

    A batch whose statistics are not finite (NaN or infinity), or whose new running
    statistics would not be finite or would have a negative variance, leaves the
    running statistics untouched; its output is still what the formula gives. Input
    must be floating-point: integer input is a `TypeError`.

    In training the output has a hand-written backward pass (a `jax.custom_vjp`), so
    forward-mode autodiff of a training call (`jax.jvp`, `jax.jacfwd`) is not
    available; reverse mode, and derivatives of gradients such as Hessian-vector
    products, are. Inference is plain JAX and supports every transformation.

    !!! warning

        This layer must be used inside a `jax.vmap` (or `shard_map`) with a matching
        `axis_name`, as `eqx.nn.BatchNorm`.

    ??? cite

        [Batch Normalization: Accelerating Deep Network Training by Reducing
         Internal Covariate Shift](https://arxiv.org/abs/1502.03167)

        ```bibtex
        @inproceedings{ioffe2015batch,
            title={Batch Normalization: Accelerating Deep Network Training by
                   Reducing Internal Covariate Shift},
            author={Ioffe, Sergey and Szegedy, Christian},
            booktitle={International Conference on Machine Learning},
            pages={448--456},
            year={2015}
        }
        ```
    """

    weight: Float[Array, " channels"] | None
    bias: Float[Array, " channels"] | None
    state_index: eqx.nn.StateIndex[RunningStats]
    approach: Approach
    axis_name: Hashable | Sequence[Hashable] = eqx.field(static=True)
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)

    def __init__(
        self,
        input_size: int | np.integer,
        axis_name: Hashable | Sequence[Hashable],
        approach: str | Approach = "batch",
        momentum: ArrayLike = 0.99,
        eps: ArrayLike = 1e-5,
        channelwise_affine: bool = True,
        inference: bool = False,
        dtype=None,
    ):
        """**Arguments:**

        - `input_size`: the number of channels; each example has shape
            `(input_size, *spatial)`.
        - `axis_name`: the name of the batch axis to compute statistics over, as
            given to `jax.vmap` or `shard_map`; a tuple of names reduces over all of
            them (in one all-reduce).
        - `approach`: how statistics are used and kept: one of `"batch"`, `"ema"`,
            `"adam-correction"`, `"smooth-start"`, `"frozen"`, `"running"`,
            `"renorm"`, or an [`eqx_norm.Approach`][] object.
        - `momentum`: the weight of the old value in moving averages, in [0, 1)
            (the Equinox/Flax convention; PyTorch's `momentum=0.1` is 0.9 here).
        - `eps`: added to the variance before the square root; at least 0.
        - `channelwise_affine`: whether to learn a per-channel weight and bias.
        - `inference`: if `True`, normalise with the running statistics and leave
            them unchanged. Toggled by `eqx.nn.inference_mode`, or per call.
        - `dtype`: the dtype of the weight and bias, and of the statistics if wider
            than float32. Defaults to float32 (float64 with `jax_enable_x64`).

        **Raises:**

        A `ValueError` for a non-positive `input_size`, an unknown `approach`,
        `momentum` outside [0, 1) or a negative `eps`.
        """
        if not isinstance(input_size, (int, np.integer)) or isinstance(
            input_size, bool
        ):
            raise TypeError(
                f"`input_size` must be a positive int (the number of channels), got "
                f"{input_size!r}."
            )
        if input_size < 1:
            raise ValueError(
                f"`input_size` must be a positive int (the number of channels), got "
                f"{input_size!r}."
            )
        input_size = int(input_size)
        self.approach = as_approach(approach)
        if dtype is None:
            dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"`dtype` must be a floating dtype, got {dtype}; e.g. "
                "`dtype=jnp.float32` (or `jnp.bfloat16` for the weight and bias)."
            )
        stats_dtype = dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
        momentum = _real_scalar("momentum", momentum)
        if not 0 <= momentum < 1:
            raise ValueError(
                f"`momentum` must be in [0, 1), got {momentum}. It is the weight of "
                "the old value: PyTorch's `momentum=0.1` is `momentum=0.9` here."
            )
        if not np.asarray(momentum, stats_dtype) < 1:
            raise ValueError(
                f"`momentum={momentum!r}` rounds to 1 in the statistics' dtype "
                f"{stats_dtype}, which would divide by zero in the running statistics; "
                f"use a momentum below {float(np.nextafter(stats_dtype.type(1), 0))}."
            )
        eps = _real_scalar("eps", eps)
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(
                f"`eps` must be finite and at least 0, got {eps}; e.g. `eps=1e-5`."
            )
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype)
            self.bias = jnp.zeros((input_size,), dtype)
        else:
            self.weight = None
            self.bias = None
        self.state_index = eqx.nn.StateIndex(
            self.approach.init(input_size, stats_dtype)
        )
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum

    def statistics(
        self, state: eqx.nn.State
    ) -> tuple[Float[Array, " channels"], Float[Array, " channels"]]:
        """The per-channel statistics that inference would use now.

        **Arguments:**

        - `state`: the `eqx.nn.State` holding this layer's statistics.

        **Returns:**

        A 2-tuple `(mean, var)` of arrays of shape `(input_size,)`.
        """
        return self.approach.infer(self._running(state), self.momentum)

    def _running(self, state: eqx.nn.State) -> RunningStats:
        """This layer's running statistics, checked to be those of `input_size`
        channels: a state of another layer would otherwise broadcast silently."""
        running = state.get(self.state_index)
        for name, array in (("mean", running.mean), ("var", running.var)):
            if array.shape != (self.input_size,):
                raise ValueError(
                    f"`eqx_norm.BatchNorm(input_size={self.input_size})` was given a "
                    f"state whose running {name} has shape {tuple(array.shape)}, not "
                    f"({self.input_size},): the state of another layer. Pass the state "
                    "made with this model, e.g. by `eqx.nn.make_with_state`."
                )
        return running

    def with_approach(self, approach: str | Approach) -> "BatchNorm":
        """This layer with another approach; its state stays valid.

        **Arguments:**

        - `approach`: as in `__init__`.

        **Returns:**

        A new `BatchNorm`, sharing weight, bias and state index with this one.
        """
        return eqx.tree_at(
            lambda bn: bn.approach,
            self,
            as_approach(approach),
            is_leaf=lambda x: isinstance(x, Approach),
        )

    @jax.named_scope("eqx_norm.BatchNorm")
    def __call__(
        self,
        x: Array,
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Array, eqx.nn.State]:
        """**Arguments:**

        - `x`: an array of shape `(input_size, *spatial)`: one example.
        - `state`: the `eqx.nn.State` holding the running statistics.
        - `key`: ignored; for compatibility with the rest of the Equinox API.
        - `inference`: overrides `self.inference` for this call if not `None`.

        **Returns:**

        A 2-tuple of the output (same shape and dtype as `x`) and the new state.

        **Raises:**

        - `ValueError` if `x` does not have `input_size` channels, or if the batch
            has a single value per channel and the approach needs a batch variance.
        - `NameError` if no enclosing `vmap`/`shard_map` has the `axis_name`.
        """
        del key
        self._check_input(x)
        running = self._running(state)
        if self.inference if inference is None else inference:
            mean, var = self.approach.infer(running, self.momentum)
            # Plain JAX, so that forward-mode autodiff (jax.jvp) works in inference.
            return self._normalise(x, mean, var, affine_formula), state
        batch = self._batch_statistics(x, running)
        mean, var, new_running = self.approach.train(
            batch, running, self.momentum, self.eps
        )
        state = state.set(self.state_index, _guarded(batch, new_running, running))
        return self._normalise(x, mean, var, affine), state

    def _check_input(self, x: Array) -> None:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"`eqx_norm.BatchNorm` got an input of dtype {x.dtype}; it normalises "
                "floating-point input only (an integer output would truncate the "
                "normalised values). Cast it first, e.g. `x.astype(jnp.float32)`, or "
                "`x / 255.0` for uint8 images."
            )
        if x.ndim == 0 or x.shape[0] != self.input_size:
            raise ValueError(
                f"`eqx_norm.BatchNorm(input_size={self.input_size})` got an example "
                f"of shape {tuple(x.shape)}; each example must have shape "
                f"(input_size, *spatial) = ({self.input_size}, ...). Check "
                "`input_size`, or vmap the layer over the batch axis."
            )

    def _batch_statistics(self, x: Array, running: RunningStats) -> BatchStats:
        """This batch's per-channel mean and biased variance, over the example's
        spatial axes and every named axis, in one all-reduce."""
        n = math.prod(x.shape[1:]) * _axis_size(self.axis_name)
        if n == 1 and self.approach.needs_batch_variance:
            works = [k for k, v in APPROACHES.items() if not v.needs_batch_variance]
            raise OneValuePerChannelError(
                f"`eqx_norm.BatchNorm(approach={self.approach!r})` got one value "
                "per channel in a training batch (batch size 1 and no spatial "
                f"axes), so there is no batch variance. Use `approach=` one of "
                f"{works}, or a larger batch."
            )
        # The second moment is taken about the current inference mean, a constant
        # for the gradient, so that large offsets do not cancel in E[x^2] - E[x]^2.
        shift, _ = self.approach.infer(running, self.momentum)
        shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0))
        # XLA combines the two independent psums into one all-reduce.
        mean, second = lax.pmean(
            local_moments(x, shift, running.mean.dtype), self.axis_name
        )
        return BatchStats(
            mean=mean, var=jnp.maximum(second - (mean - shift) ** 2, 0), n=n
        )

    def _normalise(self, x: Array, mean: Array, var: Array, apply) -> Array:
        """`(x - mean) / sqrt(var + eps) * weight + bias`, as one multiply-add on
        `x` per channel."""
        dtype = mean.dtype
        scale = lax.rsqrt(var + self.eps)
        if self.weight is not None and self.bias is not None:
            scale = scale * self.weight.astype(dtype)
            offset = self.bias.astype(dtype) - mean * scale
        else:
            offset = -mean * scale
        return apply(x, scale, offset)


def _guarded(batch: BatchStats, new: RunningStats, old: RunningStats) -> RunningStats:
    """`new`, unless this batch's or the new statistics are not finite, or the new
    variance is negative: then `old`, so one bad batch (or an approach, built-in or
    a user's, that overflows) cannot poison inference. XLA fuses the check into one
    reduction."""
    stats = (batch.mean, batch.var, new.mean, new.var)
    keep = jnp.all(
        functools.reduce(jnp.logical_and, map(jnp.isfinite, stats)) & (new.var >= 0)
    )
    return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)
