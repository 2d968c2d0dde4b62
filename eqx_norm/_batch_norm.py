import functools
import math
from collections.abc import Hashable, Sequence
from typing import cast

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._approaches import APPROACHES, Approach, BatchStats, RunningStats, as_approach
from ._checks import real_statistic, step_count
from ._kernels import affine, expand, local_sums, masked_sums
from ._state import Recording


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


def _int(name: str, value, example: str) -> int:
    """`value` as a Python int, or a `TypeError` naming the argument."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got {value!r}; e.g. {example}.")
    return int(value)


def _real_scalar(name: str, value) -> float:
    """`value` as a Python float, or a `TypeError` naming the argument."""
    try:
        if np.ndim(value) != 0 or isinstance(value, (bool, np.bool_, str, bytes)):
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
    state_index: eqx.nn.StateIndex[RunningStats]
    approach: Approach
    axis_name: Hashable | Sequence[Hashable] = eqx.field(static=True)
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    channel_axis: int = eqx.field(static=True)
    virtual_batch_size: int | None = eqx.field(static=True)

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
        *,
        channel_axis: int = 0,
        virtual_batch_size: int | None = None,
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
        - `channel_axis`: the axis of each example that holds the channels: `0`
            (the default, Equinox's layout) for `(channels, *spatial)`, `-1` for
            channels-last such as `(time, channels)`; any axis, negative or not.
        - `virtual_batch_size`: for ghost batch normalisation, the number of
            consecutive examples (along the named axes, in their order) normalised
            together; `None` (the default) normalises the whole batch together.
            See "Ghost batches" in the guide.

        **Raises:**

        A `ValueError` for a non-positive `input_size` or `virtual_batch_size`, an
        unknown `approach`, `momentum` outside [0, 1) or a negative `eps`; a
        `TypeError` for a `channel_axis` or `virtual_batch_size` that is not an int.
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
        channel_axis = _int("channel_axis", channel_axis, "`channel_axis=-1`")
        if virtual_batch_size is not None:
            virtual_batch_size = _int(
                "virtual_batch_size", virtual_batch_size, "`virtual_batch_size=32`"
            )
            if virtual_batch_size < 1:
                raise ValueError(
                    "`virtual_batch_size` must be a positive number of examples, or "
                    f"None; got {virtual_batch_size}."
                )
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
        self.channel_axis = channel_axis
        self.virtual_batch_size = virtual_batch_size

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
        return state.set(self.state_index, RunningStats(mean, var, counter))

    def _running(self, state: eqx.nn.State) -> RunningStats:
        """This layer's running statistics, checked to be those of `input_size`
        channels: a state of another layer would otherwise broadcast silently."""
        running = state.get(self.state_index)
        if isinstance(running, Recording):  # in a recording pass
            running = running.running
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
        axis = self._check_input(x)
        running = self._running(state)
        if self.inference if inference is None else inference:
            mean, var = self.approach.infer(running, self.momentum)
            return self._normalise(x, axis, mean, var), state
        if mask is not None:
            mask = self._check_mask(mask, x, axis)
        if self.virtual_batch_size is None:
            mean, var, new, batch = self._train(x, axis, running, mask)
        else:
            mean, var, new, batch = self._train_ghost(x, axis, running, mask)
        if isinstance(state.get(self.state_index), Recording):
            # A recording pass (see `Recording`): its output is this batch's
            # statistics, and the running statistics stay as they are.
            index = cast(eqx.nn.StateIndex[Recording], self.state_index)
            n = jnp.asarray(batch.n, jnp.int32)
            state = state.set(index, Recording(running, batch._replace(n=n)))
        else:
            state = state.set(self.state_index, new)
        return self._normalise(x, axis, mean, var), state

    def _check_input(self, x: Array) -> int:
        """The channel axis of `x` as a non-negative int, once `x` is checked."""
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"`eqx_norm.BatchNorm` got an input of dtype {x.dtype}; it normalises "
                "floating-point input only (an integer output would truncate the "
                "normalised values). Cast it first, e.g. `x.astype(jnp.float32)`, or "
                "`x / 255.0` for uint8 images."
            )
        if not -x.ndim <= self.channel_axis < x.ndim:
            raise ValueError(
                f"`eqx_norm.BatchNorm(input_size={self.input_size}, channel_axis="
                f"{self.channel_axis})` got an example of shape {tuple(x.shape)}, "
                "which has no axis "
                f"{self.channel_axis}. Pass one example (vmap the layer over the "
                "batch axis), or set `channel_axis` to the axis of the channels."
            )
        axis = self.channel_axis % x.ndim
        if x.shape[axis] != self.input_size:
            raise ValueError(
                f"`eqx_norm.BatchNorm(input_size={self.input_size}, channel_axis="
                f"{self.channel_axis})` got an example of shape {tuple(x.shape)}, "
                f"whose axis {axis} has {x.shape[axis]} values, not {self.input_size}."
                " Check `input_size` and `channel_axis`, or vmap the layer over the "
                "batch axis."
            )
        return axis

    def _check_mask(self, mask: ArrayLike, x: Array, axis: int) -> Array:
        """`mask` broadcast to `x`'s shape with 1 on the channel axis."""
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(
                f"`mask` must be a boolean array, got dtype {mask.dtype}; e.g. "
                "`mask=lengths > jnp.arange(time)`, or `mask.astype(bool)`."
            )
        shape = x.shape[:axis] + x.shape[axis + 1 :]
        try:
            mask = jnp.broadcast_to(mask, shape)
        except ValueError:
            raise ValueError(
                f"`mask` of shape {tuple(mask.shape)} does not broadcast to {shape}, "
                f"the example's shape {tuple(x.shape)} without its channel axis "
                f"{axis}. Give one boolean per value of a channel, e.g. shape "
                f"{shape}, or `()` for the whole example."
            ) from None
        return jnp.expand_dims(mask, axis)

    def _train(self, x, axis, running, mask):
        """The normalising statistics of this batch, the new running statistics, and
        the batch statistics that they were updated from."""
        moments, n = self._gather(x, axis, running, mask, groups=None)
        batch = _batch_stats(moments, n)
        if mask is None:
            mean, var, new = self.approach.train(
                batch, running, self.momentum, self.eps
            )
            return mean, var, _guarded(batch, new, running), batch
        enough = self._enough(n)
        batch = batch._replace(n=jnp.where(enough, n, 2))
        mean, var, new = self.approach.train(batch, running, self.momentum, self.eps)
        mean, var = self._or_inference(enough, mean, var, running)
        new = _where(enough, _guarded(batch, new, running), running)
        return mean, var, new, batch

    def _train_ghost(self, x, axis, running, mask):
        """As `_train`, for ghost batches: the statistics of this example's group,
        and the running statistics updated once from the mean over groups."""
        vbs = self.virtual_batch_size
        assert vbs is not None
        size = _axis_size(self.axis_name)
        if size % vbs:
            raise ValueError(
                f"`eqx_norm.BatchNorm(virtual_batch_size={vbs})` got a batch of "
                f"{size} examples along {self.axis_name!r}, which does not split "
                "into groups of that size. Use a batch size that is a multiple of "
                "`virtual_batch_size`, or another `virtual_batch_size`."
            )
        moments, n = self._gather(x, axis, running, mask, groups=size // vbs)
        groups = _batch_stats(moments, n)  # every group's, stacked on axis 0
        if mask is None:
            enough = jnp.ones(groups.mean.shape[:1], bool)
        else:
            enough = self._enough(n)
            groups = groups._replace(n=jnp.where(enough, n, 2))
        # This example's group is normalised with its own statistics...
        own = _axis_index(self.axis_name) // vbs
        n_own = groups.n if mask is None else jnp.asarray(groups.n)[own]
        batch = BatchStats(groups.mean[own], groups.var[own], n_own)
        mean, var, _ = self.approach.train(batch, running, self.momentum, self.eps)
        # ... and the running statistics are updated once, from the mean over the
        # groups that have enough values.
        trained = jnp.sum(enough)
        dtype = groups.mean.dtype
        weight = enough.astype(dtype) / jnp.maximum(trained, 1).astype(dtype)
        over_groups = BatchStats(
            mean=weight @ groups.mean,
            var=weight @ groups.var,
            n=groups.n
            if mask is None
            else jnp.sum(jnp.where(enough, groups.n, 0)) // jnp.maximum(trained, 1),
        )
        _, _, new = self.approach.train(over_groups, running, self.momentum, self.eps)
        new = _guarded(over_groups, new, running)
        if mask is None:
            return mean, var, new, over_groups
        mean, var = self._or_inference(enough[own], mean, var, running)
        return mean, var, _where(trained > 0, new, running), over_groups

    def _enough(self, n) -> Array:
        """Whether a masked batch (or group) of `n` values per channel can train."""
        return n >= (2 if self.approach.needs_batch_variance else 1)

    def _or_inference(self, enough, mean, var, running):
        """`(mean, var)`, or where `enough` is false the inference statistics."""
        infer_mean, infer_var = self.approach.infer(running, self.momentum)
        return jnp.where(enough, mean, infer_mean), jnp.where(enough, var, infer_var)

    def _gather(self, x, axis, running, mask, groups):
        """The moments of this batch about a shift, reduced across every named axis
        in one collective: `(mean, second moment about shift, shift)` per channel,
        and `n`. With `groups`, those of every group, stacked on a leading axis.

        `n` is a static int without a mask, else an array (of groups, if any).
        """
        size = _axis_size(self.axis_name)
        n = math.prod(x.shape) // self.input_size * size
        if groups is not None:
            n //= groups
        if n == 1 and self.approach.needs_batch_variance:
            self._one_value_per_channel(groups)
        dtype = running.mean.dtype
        # The second moment is taken about the current inference mean, a constant
        # for the gradient, so that large offsets do not cancel in E[x^2] - E[x]^2.
        shift, _ = self.approach.infer(running, self.momentum)
        shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0))
        if mask is None and groups is None:
            # Two independent psums, which XLA combines into one all-reduce.
            first, second = lax.psum(local_sums(x, shift, axis, dtype), self.axis_name)
            return (first / n, second / n, shift), n
        if mask is None:
            first, second = local_sums(x, shift, axis, dtype)
            per_example = math.prod(x.shape) // self.input_size
            sums = (first, second, jnp.asarray(per_example, dtype))
        else:
            sums = masked_sums(x, shift, mask, axis, dtype)
        if groups is not None:
            # Each example adds its sums into its group's row: still one psum.
            own = _axis_index(self.axis_name) // (size // groups)
            row = jnp.arange(groups, dtype=own.dtype) == own
            sums = tuple(jnp.where(expand(row, s.ndim + 1, 0), s, 0) for s in sums)
        first, second, count = lax.psum(sums, self.axis_name)
        safe = jnp.maximum(count, 1)
        moments = (_over(first, safe), _over(second, safe), shift)
        # Without a mask `n` is static.
        return moments, n if mask is None else count.astype(jnp.int32)

    def _one_value_per_channel(self, groups):
        works = [k for k, v in APPROACHES.items() if not v.needs_batch_variance]
        where = (
            "a training batch (batch size 1 and no spatial axes)"
            if groups is None
            else f"each ghost batch (`virtual_batch_size={self.virtual_batch_size}` "
            "and no spatial axes)"
        )
        raise OneValuePerChannelError(
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


def _where(keep: Array, new: RunningStats, old: RunningStats) -> RunningStats:
    return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)


def _axis_index(axis_name: Hashable | Sequence[Hashable]) -> Array:
    """This example's index along the named axes, the last varying fastest."""
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else axis_name
    return lax.axis_index(names)


def _over(total: Array, count: Array) -> Array:
    """`total / count`, the count broadcast over the trailing channel axis."""
    return total / count[..., None] if count.ndim else total / count


def _batch_stats(moments, n) -> BatchStats:
    """The batch mean and biased variance from the mean and the second moment
    about `shift`."""
    mean, second, shift = moments
    return BatchStats(mean=mean, var=jnp.maximum(second - (mean - shift) ** 2, 0), n=n)


def _guarded(batch: BatchStats, new: RunningStats, old: RunningStats) -> RunningStats:
    """`new`, unless this batch's or the new statistics are not finite, or the new
    variance is negative: then `old`, so one bad batch (or an approach, built-in or
    a user's, that overflows) cannot poison inference. XLA fuses the check into one
    reduction."""
    stats = (batch.mean, batch.var, new.mean, new.var)
    keep = jnp.all(
        functools.reduce(jnp.logical_and, map(jnp.isfinite, stats)) & (new.var >= 0)
    )
    return _where(keep, new, old)
