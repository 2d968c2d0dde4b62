"""How the layer's two passes over the input are written for speed.

The maths of [`eqx_norm.BatchNorm`][] is in `_batch_norm.py`; this module holds only
the shapes of code that make XLA fuse those passes well, each justified by the
benchmarks in `benchmarks/` (see their README):

- `local_moments`: the per-example sums of the forward pass, each reduction reading
  the input alone, rematerialised in the backward pass instead of stored;
- `affine`: the output `x * scale + offset` with a hand-written backward pass (the
  closed form, one fused sum each for the scale and offset gradients);
- `_unshared`: the CPU-only barrier that keeps XLA:CPU from writing a float32 copy of
  a half-precision batch that two reductions read.
"""

import functools

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array


def expand(v: Array, ndim: int) -> Array:
    """A per-channel vector shaped to broadcast against an `ndim`-D example."""
    return v.reshape(v.shape + (1,) * (ndim - 1))


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


def _moments(x: Array, shift: Array, dtype) -> tuple[Array, Array]:
    spatial = tuple(range(1, x.ndim))
    x1, x2 = (x, x) if x.dtype == dtype else _unshared(x, x)
    centred = x2.astype(dtype) - expand(shift, x.ndim)
    return jnp.mean(x1.astype(dtype), spatial), jnp.mean(centred * centred, spatial)


def local_moments(x: Array, shift: Array, dtype) -> tuple[Array, Array]:
    """This example's per-channel mean of `x`, and mean of `(x - shift)**2`, in
    `dtype`.

    Each of the two reductions reads `x` alone (the shift is taken off the mean
    after the reduction), so that XLA fuses the conversion, the shift and the square
    into the reductions instead of writing a shifted or converted copy of `x` out;
    the backward pass recomputes the shifted input instead of storing it.
    """
    return jax.checkpoint(functools.partial(_moments, dtype=dtype))(x, shift)


def affine_formula(x: Array, scale: Array, offset: Array) -> Array:
    """`x * scale + offset` per channel, in the dtype of `scale`, returned in x's."""
    y = x.astype(scale.dtype) * expand(scale, x.ndim) + expand(offset, x.ndim)
    return y.astype(x.dtype)


# The same with a hand-written backward pass. Its forward pass is plain JAX, so
# derivatives of the gradient (Hessian-vector products) work; forward-mode autodiff
# of the training output itself (`jax.jvp`) does not.
affine = jax.custom_vjp(affine_formula)


def _affine_fwd(x, scale, offset):
    return affine_formula(x, scale, offset), (x, scale)


def _affine_bwd(residuals, dy):
    # The closed form, written so that each of the two sums is one fused pass over
    # dy (and x) and dy is converted to the statistics' dtype once per use.
    x, scale = residuals
    dtype = scale.dtype
    spatial = tuple(range(1, x.ndim))
    dy1, dy2, x2 = (dy, dy, x) if x.dtype == dtype else _unshared(dy, dy, x)
    d_scale = jnp.sum(dy2.astype(dtype) * x2.astype(dtype), spatial)
    d_offset = jnp.sum(dy1.astype(dtype), spatial)
    dx = (dy.astype(dtype) * expand(scale, x.ndim)).astype(x.dtype)
    return dx, d_scale, d_offset


affine.defvjp(_affine_fwd, _affine_bwd)
