from collections.abc import Hashable, Sequence
from typing import cast

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._checks import (
    channel_axis_of,
    count_of,
    floating_dtype,
    momentum_below_one,
    momentum_value,
    real_statistic,
    step_count,
)
from ._approach import AbstractApproach, RunningStats
from ._approaches import APPROACHES, as_approach
from ._fields import (
    channel_axis_field,
    compute_channels_last_field,
    eps_field,
    static_flag,
    virtual_batch_size_field,
)
from ._groups import Groups, checked_mask, statistics
from ._guard import guarded, keep_where
from ._kernels import affine
from ._recording import Recording


class OneValuePerChannelError(ValueError):
    """A training batch with one value per channel, in an approach that needs a
    batch variance (raised at trace time)."""


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
    | `"tracking"` | the batch statistics | the best of several debiased EMAs |

    See [`eqx_norm.Batch`][], [`eqx_norm.EMA`][], [`eqx_norm.AdamCorrection`][],
    [`eqx_norm.SmoothStart`][], [`eqx_norm.Frozen`][], [`eqx_norm.Running`][],
    [`eqx_norm.Renorm`][] and [`eqx_norm.Tracking`][] for the exact formulas, and
    [`eqx_norm.Approach`][] to write your own.

    All statistics live in an `eqx.nn.State` as a [`eqx_norm.RunningStats`][]
    (mean and variance as inference uses them, and a count), the same arrays for
    every built-in approach, so one model can switch approach on the same state.
    They are kept in float32 (or `dtype`, if wider) whatever the input's dtype; the
    output has the input's dtype.

    The batch mean and second moment are reduced across `axis_name` in one
    all-reduce (with a mask or ghost batches, one `psum` of the sums and counts).
    So that large offsets do not cancel in $E[x^2] - E[x]^2$, the input is first
    shifted by the current inference mean (a constant for the gradient); the
    precision this gives, and that of the first step (shifted by 0), is set out on
    the documentation's "Precision" page.

    A batch whose statistics are not finite (NaN or infinity), or whose new running
    statistics would not be finite or would have a negative variance, leaves the
    running statistics untouched; its output is still what the formula gives. Input
    must be floating-point: integer input is a `TypeError`.

    Channels may be on any axis of the example (`channel_axis`); a `mask` keeps
    padding out of the batch statistics; `virtual_batch_size` normalises groups of
    consecutive examples on their own (ghost batch normalisation). Training and
    inference support every JAX transformation: reverse and forward mode
    (`jax.jvp`, `jax.jacfwd`, `jax.hessian`), `jit`, `vmap` and `shard_map`.

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
    state_index: eqx.nn.StateIndex[RunningStats | Recording]
    approach: AbstractApproach
    axis_name: Hashable | Sequence[Hashable] = eqx.field(static=True)
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True, converter=eps_field)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True, converter=momentum_value)
    channel_axis: int = eqx.field(static=True, converter=channel_axis_field)
    virtual_batch_size: int | None = eqx.field(
        static=True, converter=virtual_batch_size_field
    )
    # Not static: a flag users switch on a built model, as `inference`.
    compute_channels_last: bool = eqx.field(converter=compute_channels_last_field)

    def __init__(
        self,
        input_size: int | np.integer,
        axis_name: Hashable | Sequence[Hashable],
        approach: str | AbstractApproach = "batch",
        momentum: ArrayLike = 0.99,
        eps: ArrayLike = 1e-5,
        channelwise_affine: bool = True,
        inference: bool = False,
        dtype=None,
        *,
        channel_axis: int = 0,
        virtual_batch_size: int | None = None,
        compute_channels_last: bool = False,
    ):
        """**Arguments:**

        - `input_size`: the number of channels; each example has shape
            `(input_size, *spatial)`.
        - `axis_name`: the name of the batch axis to compute statistics over, as
            given to `jax.vmap` or `shard_map`; a tuple of names reduces over all of
            them (in one all-reduce).
        - `approach`: how statistics are used and kept: one of `"batch"`, `"ema"`,
            `"adam-correction"`, `"smooth-start"`, `"frozen"`, `"running"`,
            `"renorm"`, `"tracking"`, or an [`eqx_norm.Approach`][] object.
        - `momentum`: the weight of the old value in moving averages, in [0, 1)
            (the Equinox/Flax convention; PyTorch's `momentum=0.1` is 0.9 here).
        - `eps`: added to the variance before the square root; at least 0.
        - `channelwise_affine`: whether to learn a per-channel weight and bias.
        - `inference`: if `True`, normalise with the running statistics and leave
            them unchanged. Toggled by `eqx.nn.inference_mode`, or per call.
        - `dtype`: the dtype of the weight and bias, and of the statistics if wider
            than float32. Defaults to float32 (float64 with `jax_enable_x64`).
        - `channel_axis`: the axis of each example that holds the channels: `0`
            (the default, Equinox's layout) for `(channels, *spatial)`, `-1` for
            channels-last such as `(time, channels)`; any axis, negative or not.
        - `virtual_batch_size`: for ghost batch normalisation, the number of
            consecutive examples (along the named axes, in their order) normalised
            together; `None` (the default) normalises the whole batch together.
            See "Ghost batches" in the guide.
        - `compute_channels_last`: if `True`, a training call moves the channels to
            the example's last axis, normalises there and moves them back: the same
            values, laid out as XLA's convolutions on the CPU lay out their outputs.
            After an `eqx.nn.Conv` on the CPU it saves the copy that XLA otherwise
            makes of every convolution's output, most of BatchNorm's cost in a
            residual CNN; on input that XLA holds channels-first (such as a batch
            given to the step as it is) it adds such a copy instead. Measure your
            model (the "Benchmarks" page shows both). No effect when the channels
            already are on the last axis, nor in inference.

        **Raises:**

        A `ValueError` for a non-positive `input_size` or `virtual_batch_size`, an
        unknown `approach`, `momentum` outside [0, 1) or a negative `eps`; a
        `TypeError` for a `channel_axis` or `virtual_batch_size` that is not an int,
        or a `compute_channels_last` that is not a bool.
        """
        input_size = count_of(
            "input_size", input_size, "the number of channels", "input_size=64"
        )
        self.approach = as_approach(approach)
        if dtype is None:
            dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
        dtype = floating_dtype("dtype", dtype, "dtype=jnp.float32")
        stats_dtype = dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
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
        self.eps = eps  # pyright: ignore[reportAttributeAccessIssue]
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum  # pyright: ignore[reportAttributeAccessIssue]
        self.channel_axis = channel_axis
        self.virtual_batch_size = virtual_batch_size
        self.compute_channels_last = compute_channels_last

    def __check_init__(self):
        # The momentum checked against the statistics' dtype, which it must stay
        # below 1 in (at 1 the debiasing would divide by zero).
        running = cast(RunningStats, self.state_index.init)
        momentum_below_one(self.momentum, running.mean.dtype)

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

    def set_statistics(
        self,
        state: eqx.nn.State,
        mean: ArrayLike,
        var: ArrayLike,
        *,
        counter: int | Int[ArrayLike, ""] | None = None,
    ) -> eqx.nn.State:
        """The state with this layer's statistics replaced: for bringing in the
        statistics of a pretrained model (see "Serving and porting" in the guide).

        For every built-in approach the stored statistics are the ones inference
        uses, so after this call `statistics(state)` returns `(mean, var)`. It works
        under `jit` too, with every argument traced; bad values then stop the call
        with a runtime error (`eqx.error_if`) instead of a state that never trains.

        **Arguments:**

        - `state`: the `eqx.nn.State` holding this layer's statistics.
        - `mean`: the per-channel mean, shape `(input_size,)`: real numbers, floating
            or integer (converted to the statistics' dtype).
        - `var`: the per-channel variance (as inference uses it; PyTorch's and
            Flax's running variances are), shape `(input_size,)`, non-negative.
        - `counter`: the step counter to store (for the debiased approaches, how
            many training steps the statistics stand for: PyTorch's
            `num_batches_tracked`; for `"running"`, how many values), an integer
            scalar from 0 to 2**31 - 1. `None` keeps the current one.

        **Returns:**

        The new state.

        **Raises:**

        A `ValueError` for a wrong shape, a value that is not finite (in the
        statistics' dtype), a negative variance or a `counter` out of range; a
        `TypeError` for complex or boolean statistics, or a `counter` that is not an
        integer. Under `jit`, values that are not finite, negative or out of range
        raise at run time instead, with the same message.
        """
        old = self._running(state)
        size, dtype = self.input_size, old.mean.dtype
        where = "set_statistics"
        mean = real_statistic("mean", mean, size, dtype, where=where, variance=False)
        var = real_statistic("var", var, size, dtype, where=where, variance=True)
        if counter is None:
            counter = old.counter
        else:
            example = "counter=int(num_batches_tracked)"
            counter = step_count("counter", counter, where=where, example=example)
        new = self.approach.with_statistics(old, mean, var, counter)
        return state.set(self.state_index, new)

    def _running(self, state: eqx.nn.State) -> RunningStats:
        """This layer's running statistics, checked to be those of `input_size`
        channels: a state of another layer would otherwise broadcast silently."""
        running = state.get(self.state_index)
        if isinstance(running, Recording):  # in a recording pass
            running = running.running
        for name, array in (("mean", running.mean), ("var", running.var)):
            if array.shape[1:] == (self.input_size,):
                raise ValueError(
                    f"`eqx_norm.BatchNorm(input_size={self.input_size})` was given a "
                    f"state whose running {name} has shape {tuple(array.shape)}: a "
                    f"leading axis of {array.shape[0]} (the batch size) before the "
                    f"{self.input_size} channels. The state was returned by a "
                    "`jax.vmap` that mapped it over the batch: give the state "
                    "`out_axes=None`, e.g. `jax.vmap(model, in_axes=(0, None), "
                    "out_axes=(0, None), axis_name=...)(x, state)`, and start again "
                    "from the state before that call."
                )
            if array.shape != (self.input_size,):
                raise ValueError(
                    f"`eqx_norm.BatchNorm(input_size={self.input_size})` was given a "
                    f"state whose running {name} has shape {tuple(array.shape)}, not "
                    f"({self.input_size},): the state of another layer. Pass the state "
                    "made with this model, e.g. by `eqx.nn.make_with_state`."
                )
        return running

    def with_approach(self, approach: str | AbstractApproach) -> "BatchNorm":
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
            is_leaf=lambda x: isinstance(x, AbstractApproach),
        )

    def with_compute_channels_last(
        self, compute_channels_last: bool = True
    ) -> "BatchNorm":
        """This layer with `compute_channels_last` set (see `__init__`); its state
        stays valid. The same as `eqx.tree_at(lambda b: b.compute_channels_last,
        bn, flag)`, with the flag checked.

        **Arguments:**

        - `compute_channels_last`: `True` or `False`.

        **Returns:**

        A new `BatchNorm`, sharing weight, bias and state index with this one.

        **Raises:**

        A `TypeError` for a value that is not a bool.
        """
        value = compute_channels_last_field(compute_channels_last)
        return eqx.tree_at(lambda bn: bn.compute_channels_last, self, value)

    @jax.named_scope("eqx_norm.BatchNorm")
    def __call__(
        self,
        x: Array,
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        mask: Bool[ArrayLike, "..."] | None = None,
    ) -> tuple[Array, eqx.nn.State]:
        """**Arguments:**

        - `x`: one example, with `input_size` channels on `channel_axis`, e.g. of
            shape `(input_size, *spatial)` for the default `channel_axis=0`.
        - `state`: the `eqx.nn.State` holding the running statistics.
        - `key`: ignored; for compatibility with the rest of the Equinox API.
        - `inference`: overrides `self.inference` for this call if not `None`.
        - `mask`: which values of this example enter the batch statistics: a
            boolean array broadcastable to the example's shape without the channel
            axis (`()` selects or drops the whole example, `(time,)` steps of a
            `(time, channels)` example). `n` is then the number of selected values
            per channel, across every named axis. Every position of the output is
            normalised, selected or not. A training batch with too few selected
            values (none; one per channel where the approach needs a batch
            variance) leaves the state unchanged and is normalised as inference
            would normalise it. Ignored in inference. `None`: every value.

        **Returns:**

        A 2-tuple of the output (same shape and dtype as `x`) and the new state.

        **Raises:**

        - `ValueError` if `x` does not have `input_size` channels on
            `channel_axis`, if the batch has a single value per channel (or a ghost
            batch does) and the approach needs a batch variance, or if
            `virtual_batch_size` does not divide the batch.
        - `TypeError` for non-floating `x` or a non-boolean `mask`.
        - `NameError` if no enclosing `vmap`/`shard_map` has the `axis_name`.
        """
        del key
        axis = channel_axis_of(x, self.input_size, self.channel_axis)
        running = self._running(state)
        if static_flag(self.inference if inference is None else inference, "inference"):
            mean, var = self.approach.infer(running, self.momentum)
            return self._normalise(x, axis, mean, var), state
        if mask is not None:
            mask = checked_mask(mask, x, axis)
        example_axis, last = axis, x.ndim - 1
        channels_last = static_flag(self.compute_channels_last, "compute_channels_last")
        if channels_last and axis != last:
            x, axis = jnp.moveaxis(x, axis, last), last
            if mask is not None:
                mask = jnp.moveaxis(mask, example_axis, last)
        mean, var, new, batch = self._train(x, axis, running, mask)
        if isinstance(state.get(self.state_index), Recording):
            # A recording pass (see `Recording`): its output is this batch's
            # statistics, and the running statistics stay as they are.
            n = jnp.asarray(batch.n, jnp.int32)
            state = state.set(self.state_index, Recording(running, batch._replace(n=n)))
        else:
            state = state.set(self.state_index, new)
        y = self._normalise(x, axis, mean, var)
        return jnp.moveaxis(y, axis, example_axis), state

    def _train(self, x, axis, running, mask):
        """The statistics that normalise this example, the new running statistics,
        and the batch statistics that they were updated from."""
        groups = Groups.of(self.axis_name, self.virtual_batch_size)
        needs_variance = self.approach.needs_batch_variance
        if needs_variance and groups.values_per_channel(x, axis) == 1:
            raise self._one_value_per_channel()
        # The second moment is taken about the current inference mean, a constant
        # for the gradient, so that large offsets do not cancel in E[x^2] - E[x]^2.
        shift, _ = self.approach.infer(running, self.momentum)
        shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0))
        least = 2 if needs_variance else 1
        stats = statistics(
            groups, x, axis, shift, mask, least=least, dtype=running.mean.dtype
        )
        m, eps = self.momentum, self.eps
        mean, var, new = self.approach.train(stats.own, running, m, eps)
        if self.virtual_batch_size is not None:
            # Ghost batches: the running statistics are updated once, from the mean
            # over the ghost batches.
            _, _, new = self.approach.train(stats.update, running, m, eps)
        new = guarded(stats.update, new, running)
        if stats.enough is not None:
            # A mask: a group with too few values is normalised as inference would
            # normalise it, and an update from too few leaves the state as it is.
            own_enough, update_enough = stats.enough
            infer_mean, infer_var = self.approach.infer(running, m)
            mean = jnp.where(own_enough, mean, infer_mean)
            var = jnp.where(own_enough, var, infer_var)
            new = keep_where(update_enough, new, running)
        return mean, var, new, stats.update

    def _one_value_per_channel(self) -> OneValuePerChannelError:
        works = [k for k, v in APPROACHES.items() if not v.needs_batch_variance]
        where = (
            "a training batch (batch size 1 and no spatial axes)"
            if self.virtual_batch_size is None
            else f"each ghost batch (`virtual_batch_size={self.virtual_batch_size}` "
            "and no spatial axes)"
        )
        return OneValuePerChannelError(
            f"`eqx_norm.BatchNorm(approach={self.approach!r})` got one value per "
            f"channel in {where}, so there is no batch variance. Use `approach=` one "
            f"of {works}, or a larger batch."
        )

    def _normalise(self, x: Array, axis: int, mean: Array, var: Array) -> Array:
        """`(x - mean) / sqrt(var + eps) * weight + bias`, as one multiply-add on
        `x` per channel."""
        dtype = mean.dtype
        scale = lax.rsqrt(var + self.eps)
        if self.weight is not None and self.bias is not None:
            scale = scale * self.weight.astype(dtype)
            offset = self.bias.astype(dtype) - mean * scale
        else:
            offset = -mean * scale
        return affine(x, scale, offset, axis)
