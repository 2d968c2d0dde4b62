"""What the tests share: running a layer over a batch, building and training small
models, and comparing pytrees leaf by leaf."""

import contextlib
import inspect
import re
from collections.abc import Iterator
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax

import eqx_norm


def apply(layer, x, state, *, inference=None, axis_name="batch", mask=None):
    """Run a per-example layer over the leading batch axis of `x` (and of `mask`,
    which is passed to the layer when given)."""
    kwargs = {} if inference is None else {"inference": inference}
    if inference is not None and not isinstance(layer, eqx_norm.BatchNorm):
        layer, kwargs = eqx.nn.inference_mode(layer, inference), {}
    if mask is None:
        return jax.vmap(
            lambda xi, s: layer(xi, s, **kwargs),
            in_axes=(0, None),
            out_axes=(0, None),
            axis_name=axis_name,
        )(x, state)
    return jax.vmap(
        lambda xi, mi, s: layer(xi, s, mask=mi, **kwargs),
        in_axes=(0, 0, None),
        out_axes=(0, None),
        axis_name=axis_name,
    )(x, mask, state)


def clone(state):
    """A new `eqx.nn.State` with the same arrays: `State.set` invalidates the object
    it is called on, so a state used twice must be given to each use as a copy.

    The package has the same one line as `eqx_norm._state.copy_state`, but that is
    private, and the tests use the public surface only; Equinox has no public copy
    of a state, so this is the test suite's one."""
    return jax.tree.map(lambda a: a, state)


@contextlib.contextmanager
def as_a_user_calls_it() -> Iterator[None]:
    """Calls without jaxtyping's runtime checks of the package's annotations. The
    suite runs under them (see `pyproject.toml`), and they refuse an argument of
    the wrong type with their own message before the package's checks run; a user
    has no such checks, so a test of what a user sees for a wrong type makes its
    call in here. The setting is restored on exit."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


def stored(state, index) -> eqx_norm.RunningStats:
    """The running statistics a BatchNorm layer's state index holds (outside a
    recording pass, always a `RunningStats`)."""
    return cast(eqx_norm.RunningStats, state.get(index))


def leaves(tree) -> list[np.ndarray]:
    """The arrays of `tree` as NumPy arrays: a record of it before a call that must
    leave it unchanged (see `assert_same`)."""
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def assert_same(tree, before):
    """Every leaf of `tree` equals the matching leaf of `before` (a pytree of the same
    structure, or what `leaves` recorded) bit for bit."""
    for a, b in zip(leaves(tree), leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def assert_close(tree, other, **tolerance):
    """Every leaf of `tree` equals the matching leaf of `other` within `tolerance`
    (the keywords of `np.testing.assert_allclose`)."""
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other), strict=True):
        np.testing.assert_allclose(a, b, **tolerance)


def regression_data(key, n=16):
    """A batch for `Net` and `MLP`: `n` inputs of 4 features with mean 1 and standard
    deviation 2, and `n` standard normal targets of 2."""
    kx, ky = jax.random.split(key)
    return 1 + 2 * jax.random.normal(kx, (n, 4)), jax.random.normal(ky, (n, 2))


def make(input_size=3, **kwargs):
    kwargs.setdefault("axis_name", "batch")
    return eqx.nn.make_with_state(eqx_norm.BatchNorm)(input_size, **kwargs)


def with_affine(bn, key):
    wkey, bkey = jax.random.split(key)
    n = bn.input_size
    return eqx.tree_at(
        lambda m: (m.weight, m.bias),
        bn,
        (
            1 + 0.5 * jax.random.normal(wkey, (n,)),
            0.3 * jax.random.normal(bkey, (n,)),
        ),
    )


@eqx.filter_jit
def train_step(bn, x, g, state):
    """Output, input gradient of sum(g * y), and the new state."""

    def loss(x):
        y, new_state = apply(bn, x, state)
        return jnp.sum(g * y), (y, new_state)

    (_, (y, new_state)), dx = jax.value_and_grad(loss, has_aux=True)(x)
    return y, dx, new_state


def batches(key, steps, shape, dtype=jnp.float32):
    """Batches whose per-channel mean and scale drift from step to step, as the
    activations of a network in training do."""
    c = shape[1]
    k1, k2, key = jax.random.split(key, 3)
    base_mean = 2 * jax.random.normal(k1, (c,))
    base_scale = jnp.exp(0.3 * jax.random.normal(k2, (c,)))
    idx = (None, slice(None)) + (None,) * (len(shape) - 2)
    out = []
    for t, k in enumerate(jax.random.split(key, steps)):
        mean = base_mean + 0.5 * jnp.sin(t / 5 + jnp.arange(c, dtype=jnp.float32))
        scale = base_scale * (
            1 + 0.3 * jnp.cos(t / 7 + jnp.arange(c, dtype=jnp.float32))
        )
        x = mean[idx] + scale[idx] * jax.random.normal(k, shape)
        out.append(x.astype(dtype))
    return out


class Net(eqx.Module):
    """A small regression network: Linear, BatchNorm (or nothing), activation,
    Linear; called per example with a state."""

    layers: eqx.nn.Sequential

    def __init__(
        self,
        key,
        approach="batch",
        axis_name="batch",
        norm=True,
        activation=jax.nn.relu,
    ):
        k1, k2 = jax.random.split(key)
        middle = (
            eqx_norm.BatchNorm(6, axis_name, approach=approach, momentum=0.9)
            if norm
            else eqx.nn.Identity()
        )
        self.layers = eqx.nn.Sequential(
            [
                eqx.nn.Linear(4, 6, use_bias=not norm, key=k1),
                middle,
                eqx.nn.Lambda(activation),
                eqx.nn.Linear(6, 2, key=k2),
            ]
        )

    def __call__(self, x, state):
        return self.layers(x, state)


def mse_loss(model, state, x, y):
    pred, state = apply(model, x, state)
    return jnp.mean((pred - y) ** 2), state


def one_step(opt, model, state, x, y, **options):
    """The parameters, state and loss after one jitted `sam_step(mse_loss, opt,
    **options)` from `model`, a new optimizer state and a copy of `state`."""
    params = eqx.filter(model, eqx.is_inexact_array)
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, **options))
    new_model, new_state, _, loss = step(model, clone(state), opt.init(params), x, y)
    return eqx.filter(new_model, eqx.is_inexact_array), new_state, loss


def counting(loss_fn):
    """`loss_fn` wrapped to count its calls, and the list it counts them in (an
    entry a call: traced under `jit`, a pass in the compiled step)."""
    calls = []

    def counted(*args):
        calls.append(1)
        return loss_fn(*args)

    return counted, calls


class MLP(eqx.Module):
    layers: eqx.nn.Sequential

    def __init__(
        self, approach: str | eqx_norm.AbstractApproach = "batch", key=jax.random.key(0)
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = eqx.nn.Sequential(
            [
                eqx.nn.Linear(4, 6, use_bias=False, key=k1),
                eqx_norm.BatchNorm(6, "batch", approach=approach, momentum=0.9),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Linear(6, 5, use_bias=False, key=k2),
                eqx_norm.BatchNorm(5, "batch", approach=approach, momentum=0.9),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Linear(5, 2, key=k3),
            ]
        )

    def __call__(self, x, state):
        return self.layers(x, state)


def trained_mlp(approach: str | eqx_norm.AbstractApproach = "batch", steps=3):
    """An `MLP` and its state after `steps` training calls on batches of 16 inputs
    of mean 3 and standard deviation 2."""
    model, state = eqx.nn.make_with_state(MLP)(approach)
    for k in jax.random.split(jax.random.key(1), steps):
        _, state = apply(model, 3 + 2 * jax.random.normal(k, (16, 4)), state)
    return model, state


def bn_at(model, i) -> eqx_norm.BatchNorm:
    return cast(eqx_norm.BatchNorm, model.layers[i])


def docs_variant():
    """`signed_sam(base, rho)`, the SAM variant written on the contract in a dozen
    lines of `eqx_norm.perturbed_gradient`'s docstring, run from there."""
    doc = inspect.getdoc(eqx_norm.perturbed_gradient) or ""
    code = re.search(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert code is not None
    namespace: dict[str, Any] = {"eqx_norm": eqx_norm, "optax": optax}
    namespace |= {"jax": jax, "jnp": jnp}
    exec(code.group(1), namespace)
    return namespace["signed_sam"]
