"""How the layer's two passes over the input are written for speed.

The maths of [`eqx_norm.BatchNorm`][] is in `_batch_norm.py` (and, for masks and
ghost batches, `_groups.py`); this module holds only the shapes of code that make
XLA fuse those passes well, each justified by the benchmarks in `benchmarks/` (see
their README):

- `local_sums`: the per-example sums of the forward pass, each reduction reading
  the input alone, rematerialised in the backward pass instead of stored, and
  divided by the count only after the sum over the batch;
- `affine`: the output `x * scale + offset` with a hand-written derivative (a
  `jax.custom_jvp` linear in the tangents, so that forward mode works and reverse
  mode is its transpose: one fused sum each for the scale and offset gradients);
- `_unshared`: the CPU-only barrier that keeps XLA:CPU from writing a float32 copy of
  a half-precision batch that two reductions read.

Every function takes the example's channel axis `axis`; the statistics are per
channel, over every other axis.
"""

import functools

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array


def expand(v: Array, ndim: int, axis: int) -> Array:
    """A per-channel vector shaped to broadcast against an `ndim`-D example whose
    channels are on `axis`."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def others(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis of an `ndim`-D example but the channel axis."""
    return tuple(i for i in range(ndim) if i != axis)


def _unshared(*arrays: Array) -> tuple[Array, ...]:
    """`arrays` again, as values that XLA will not merge with one another.

    XLA:CPU fuses the float32 conversion of a narrow (bfloat16, float16) array into a
    reduction only if no other reduction reads the same conversion; two reductions
    of one bfloat16 array otherwise get a float32 copy of it written out in full,
    which costs more than both reductions. Giving each reduction its own value (an
    optimisation barrier) avoids the copy. Other backends fuse such conversions
    anyway, and there the barrier would only keep XLA from fusing sibling
    reductions, so it is CPU-only.
    """
    return lax.platform_dependent(
        *arrays, cpu=lambda *a: lax.optimization_barrier(a), default=lambda *a: a
    )


def _moments(x: Array, shift: Array, weight: Array | None, *, axis: int, dtype):
    reduce = others(x.ndim, axis)
    x1, x2 = (x, x) if x.dtype == dtype else _unshared(x, x)
    centred = x2.astype(dtype) - expand(shift, x.ndim, axis)
    if weight is None:
        return jnp.sum(x1.astype(dtype), reduce), jnp.sum(centred * centred, reduce)
    w = weight.astype(dtype)
    first = jnp.sum(jnp.where(weight, x1.astype(dtype), 0), reduce)
    second = jnp.sum(jnp.where(weight, centred * centred, 0), reduce)
    return first, second, jnp.sum(w)


def local_sums(x: Array, shift: Array, axis: int, dtype) -> tuple[Array, Array]:
    """This example's per-channel sum of `x`, and sum of `(x - shift)**2`, in
    `dtype`.

    Each of the two reductions reads `x` alone (the shift is taken off the mean
    after the reduction), so that XLA fuses the conversion, the shift and the square
    into the reductions instead of writing a shifted or converted copy of `x` out;
    the backward pass recomputes the shifted input instead of storing it. They are
    sums, not means, so that under `vmap` the sum over the example and the sum over
    the batch (the caller's `psum`) are adjacent reductions, which XLA merges into
    one; a mean in between (a division) would keep them apart, two kernels each.
    """
    return _rematerialised(functools.partial(_moments, axis=axis, dtype=dtype))(
        x, shift, None
    )


def masked_sums(
    x: Array, shift: Array, mask: Array, axis: int, dtype
) -> tuple[Array, Array, Array]:
    """Over the values `mask` selects (a boolean array shaped like `x`, of size 1 on
    the channel axis): the per-channel sum of `x`, the sum of `(x - shift)**2`, and
    the number of values per channel."""
    return _rematerialised(functools.partial(_moments, axis=axis, dtype=dtype))(
        x, shift, mask
    )


def _rematerialised(moments):
    """`moments` under `jax.checkpoint`: the backward pass recomputes what it needs
    of the shifted input from `x` instead of storing it.

    On the CPU the checkpoint keeps its CSE barrier, which keeps XLA:CPU from merging
    the recomputation with the forward pass's `_unshared` reads (a float32 copy of a
    half-precision batch, otherwise). Elsewhere the barrier only costs: on a GPU it
    makes XLA write the broadcast cotangents of the two sums out in full (at
    (64, 512) float32, two arrays the size of the batch and one more kernel), so
    there the checkpoint goes without it. The choice follows the default backend
    at trace time: it only moves work and memory, never values, and choosing per
    platform at lowering (`lax.platform_dependent`) traces the moments twice, a
    quarter more tracing for a model's step."""
    return jax.checkpoint(moments, prevent_cse=jax.default_backend() == "cpu")


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def affine(x: Array, scale: Array, offset: Array, axis: int) -> Array:
    """`x * scale + offset` per channel, in the dtype of `scale`, returned in x's."""
    y = x.astype(scale.dtype) * expand(scale, x.ndim, axis)
    return (y + expand(offset, x.ndim, axis)).astype(x.dtype)


def _affine_jvp(axis, primals, tangents):
    # Linear in the tangents, so reverse mode is its transpose: the gradient of the
    # scale is one fused sum of dy * x, that of the offset one sum of dy, and dx is
    # dy * scale. Zero tangents (the input of a first layer, a frozen weight) are
    # left out rather than multiplied through at full size.
    x, scale, offset = primals
    dx, d_scale, d_offset = tangents
    dtype = scale.dtype
    y = affine(x, scale, offset, axis)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(dx.astype(dtype) * expand(scale, x.ndim, axis))
    if not isinstance(d_scale, SymbolicZero):
        (xs,) = (x,) if x.dtype == dtype else _unshared(x)
        terms.append(xs.astype(dtype) * expand(d_scale, x.ndim, axis))
    if not isinstance(d_offset, SymbolicZero):
        d_offset = expand(d_offset, x.ndim, axis)
        if not terms:
            terms.append(jnp.broadcast_to(d_offset, x.shape))
        elif x.dtype == dtype:
            terms[-1] = terms[-1] + d_offset
        else:
            # A term of its own (see `_sum_as`), made to vary over the example so
            # that under `vmap` its transpose sums over the batch in `dtype`, not
            # in the input's narrow dtype.
            terms.append(_varying_ones(x, dtype) * d_offset)
    if not terms:
        return y, jnp.zeros_like(y)
    if len(terms) == 1 or x.dtype == dtype:
        return y, functools.reduce(jnp.add, terms).astype(x.dtype)
    # A narrow input: each term is converted on its own, and on CPU kept apart, so
    # that the transpose converts the cotangent once for each of its sums instead
    # of writing one float32 copy that they share (see `_unshared`). The forward
    # tangent then rounds once per term.
    narrow = _unshared(*(t.astype(x.dtype) for t in terms))
    return y, functools.reduce(jnp.add, narrow)


def _varying_ones(x: Array, dtype) -> Array:
    """Ones shaped like `x`, computed from `x` so that they vary wherever `x` does
    (batched under `vmap`); XLA folds them away."""
    return lax.integer_pow(x.astype(dtype), 0)


affine.defjvp(_affine_jvp, symbolic_zeros=True)
