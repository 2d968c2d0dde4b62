"""Ghost batches and masks: which values a training call of [`eqx_norm.BatchNorm`][]
takes its batch statistics over.

Without either, every value of a channel in every example along the named axes. A
`mask` keeps some values out, so that the number of values `n` is known only at run
time and may be too small to train on. With `virtual_batch_size`, the batch splits
into ghost batches of that many consecutive examples: each example is normalised
with its own ghost batch's statistics, and the running statistics are updated once,
from the mean over the ghost batches. Either way, the sums of every group are
reduced across the named axes in one collective.
"""

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array

from ._approach import BatchStats
from ._kernels import expand, local_sums, masked_sums


def checked_mask(mask: ArrayLike, x: Array, axis: int) -> Array:
    """`mask` as a boolean array shaped like the example `x` with size 1 on the
    channel axis, or a `TypeError`/`ValueError` that shows a mask that works."""
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


def axis_names(axis_name: Hashable | Sequence[Hashable]) -> tuple[Hashable, ...]:
    """`axis_name` as a tuple of names, the form the layer and the tools use: a
    tuple or list of names, or a single name."""
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def batch_size(axis_name: Hashable | Sequence[Hashable]) -> int:
    """The number of examples along every named axis, or a `NameError` that shows
    how to map one."""
    size = 1
    for name in axis_names(axis_name):
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


class Groups(NamedTuple):
    """How one training call's batch splits into the groups normalised together.

    **Attributes:**

    - `names`: the named axes, as `axis_names` gives them.
    - `size`: the number of examples along them.
    - `ghost`: the number of examples in a ghost batch, or `None` for the whole
        batch as one group.
    """

    names: tuple[Hashable, ...]
    size: int
    ghost: int | None

    @classmethod
    def of(
        cls,
        axis_name: Hashable | Sequence[Hashable],
        virtual_batch_size: int | None,
    ) -> "Groups":
        """The groups of this call's batch, or a `ValueError` if ghost batches do
        not divide it."""
        size = batch_size(axis_name)
        if virtual_batch_size is not None and size % virtual_batch_size:
            raise ValueError(
                f"`eqx_norm.BatchNorm(virtual_batch_size={virtual_batch_size})` got "
                f"a batch of {size} examples along {axis_name!r}, which does not "
                "split into groups of that size. Use a batch size that is a multiple "
                "of `virtual_batch_size`, or another `virtual_batch_size`."
            )
        return cls(axis_names(axis_name), size, virtual_batch_size)

    def values_per_channel(self, x: Array, axis: int) -> int:
        """`n` of a group with nothing masked: values per channel and example, times
        the examples in a group."""
        return math.prod(x.shape) // x.shape[axis] * (self.ghost or self.size)


class Statistics(NamedTuple):
    """What a training call takes from its batch.

    **Attributes:**

    - `own`: the statistics of this example's group (the whole batch, or its ghost
        batch): what it is normalised with.
    - `update`: the statistics the running statistics are updated from: `own`, or
        with ghost batches their mean over the ghost batches that have enough values.
    - `enough`: with a mask, whether `own` and `update` come from enough values to
        train on (a pair of boolean scalars); `None` without one.
    """

    own: BatchStats
    update: BatchStats
    enough: tuple[Array, Array] | None


def statistics(
    groups: Groups,
    x: Array,
    axis: int,
    shift: Array,
    mask: Array | None,
    *,
    least: int,
    dtype,
) -> Statistics:
    """The batch statistics of one training call, about `shift` (a per-channel
    constant for the gradient), computed in `dtype`.

    **Arguments:**

    - `groups`: the groups of the batch.
    - `x`: one example, its channels on `axis`.
    - `shift`: the per-channel value the second moment is taken about.
    - `mask`: `None`, or a boolean array shaped like `x` with size 1 on `axis`.
    - `least`: the fewest values per channel a masked group can train on.
    - `dtype`: the dtype of the statistics.
    """
    n = groups.values_per_channel(x, axis)
    if groups.ghost is None:
        return _whole_batch(groups, x, axis, shift, mask, n=n, least=least, dtype=dtype)
    return _ghost_batches(groups, x, axis, shift, mask, n=n, least=least, dtype=dtype)


def _whole_batch(groups, x, axis, shift, mask, *, n, least, dtype) -> Statistics:
    if mask is None:
        # Two independent psums, which XLA combines into one all-reduce.
        first, second = _psum(local_sums(x, shift, axis, dtype), groups.names)
        batch = _batch_stats(first / n, second / n, shift, n)
        return Statistics(batch, batch, None)
    first, second, count = _psum(masked_sums(x, shift, mask, axis, dtype), groups.names)
    safe = jnp.maximum(count, 1)
    count = count.astype(jnp.int32)
    enough = count >= least
    batch = _batch_stats(first / safe, second / safe, shift, count)
    batch = batch._replace(n=jnp.where(enough, count, 2))
    return Statistics(batch, batch, (enough, enough))


def _ghost_batches(groups, x, axis, shift, mask, *, n, least, dtype) -> Statistics:
    assert groups.ghost is not None
    rows = groups.size // groups.ghost
    own = lax.axis_index(groups.names) // groups.ghost
    if mask is None:
        first, second = local_sums(x, shift, axis, dtype)
        per_example = math.prod(x.shape) // x.shape[axis]
        sums = (first, second, jnp.asarray(per_example, dtype))
    else:
        sums = masked_sums(x, shift, mask, axis, dtype)
    # Each example adds its sums into its ghost batch's row: still one psum.
    row = jnp.arange(rows, dtype=own.dtype) == own
    sums = tuple(jnp.where(expand(row, s.ndim + 1, 0), s, 0) for s in sums)
    first, second, count = _psum(sums, groups.names)
    safe = jnp.maximum(count, 1)[:, None]
    stacked = _batch_stats(first / safe, second / safe, shift, n)
    if mask is None:
        # Every ghost batch trains, on `n` values per channel.
        return _pooled(stacked, own, jnp.ones(rows, bool), n, n, dtype)
    count = count.astype(jnp.int32)
    enough = count >= least
    count = jnp.where(enough, count, 2)
    trained = jnp.sum(enough)
    n_update = jnp.sum(jnp.where(enough, count, 0)) // jnp.maximum(trained, 1)
    stats = _pooled(stacked, own, enough, count[own], n_update, dtype)
    return stats._replace(enough=(enough[own], trained > 0))


def _psum(sums, names):
    """`lax.psum` of `sums` over the named axes, or, where JAX's varying-axes check
    (`jax.shard_map`'s default `check_vma=True`) would refuse a collective over a
    `vmap` axis, a `ValueError` that names the fix. Decided from the arrays' types
    before the call: under that check a value inside `shard_map` carries the mesh
    axes it varies over, and a name that is no mesh axis is a `vmap` axis."""
    varying = _varying(jax.tree.leaves(sums)[0])
    if varying:
        mesh = set(jax.sharding.get_abstract_mesh().axis_names)
        vmapped = [name for name in names if name not in mesh]
        if vmapped:
            raise ValueError(
                f"`eqx_norm.BatchNorm(axis_name={names!r})` reduces over the `vmap` "
                f"axis {vmapped[0]!r} inside `jax.shard_map`, whose varying-axes "
                "check refuses collectives over `vmap` axes (so does "
                "`eqx.nn.BatchNorm`'s). Pass `check_vma=False` to `jax.shard_map` "
                '("Scaling out" in the guide shows the recipe).'
            )
    return lax.psum(sums, names)


def _varying(x) -> frozenset:
    """The mesh axes `x` varies over inside `jax.shard_map` with its varying-axes
    check on (empty elsewhere), from its type."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def _pooled(stacked, own, enough, n_own, n_update, dtype) -> Statistics:
    """From the statistics of every ghost batch (`stacked`), those of this example's
    (`own`) and their mean over the ghost batches that have `enough` values."""
    weight = enough.astype(dtype) / jnp.maximum(jnp.sum(enough), 1).astype(dtype)
    update = BatchStats(weight @ stacked.mean, weight @ stacked.var, n_update)
    own_stats = BatchStats(stacked.mean[own], stacked.var[own], n_own)
    return Statistics(own_stats, update, None)


def _batch_stats(mean: Array, second: Array, shift: Array, n) -> BatchStats:
    """The batch mean and biased variance from the mean and the second moment
    about `shift`."""
    return BatchStats(mean=mean, var=jnp.maximum(second - (mean - shift) ** 2, 0), n=n)
