"""`sam_step(micro_batches=m)`: SAM and plain steps over micro-batches against the
whole-batch step and a hand-written two-pass reference."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_norm

from ..helpers import (
    Net,
    assert_close,
    assert_same,
    clone,
    leaves,
    mse_loss,
    one_step,
    regression_data,
)


def _loss_at(model, params, state, x, y):
    m = eqx.combine(params, eqx.filter(model, eqx.is_inexact_array, inverse=True))
    return mse_loss(m, clone(state), x, y)


@pytest.mark.parametrize(
    "kwargs",
    [{"micro_batches": 1}, {"perturbation": "per-micro-batch"}],
    ids=["micro_batches=1", "per-micro-batch"],
)
def test_one_micro_batch_is_the_usual_step(kwargs, getkey):
    """One micro-batch, whether perturbed by the whole batch's gradient or by its
    own, is the usual step, bit for bit."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = eqx_norm.sam(optax.sgd(0.1))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = regression_data(getkey())
    a = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))(
        model, clone(state), opt_state, x, y
    )
    b = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, **kwargs))(
        model, state, opt_state, x, y
    )
    assert_same(a, b)


def test_without_batch_norm_equals_sam_on_the_whole_batch(getkey):
    """No state to thread: the mean of four micro-batch gradients is the whole
    batch's, so the step is SAM on the whole batch, here computed in float64."""
    model, state = eqx.nn.make_with_state(Net)(getkey(), norm=False)
    x, y = regression_data(getkey())
    rho, lr = 0.05, 0.1
    opt = eqx_norm.sam(optax.sgd(lr), rho=rho)
    params = eqx.filter(model, eqx.is_inexact_array)
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, micro_batches=4))
    new_model, _, _, loss = step(model, state, opt.init(params), x, y)
    with jax.enable_x64(True):
        model64, params64 = jax.tree.map(
            lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
            (model, params),
        )
        x64, y64 = x.astype(jnp.float64), y.astype(jnp.float64)

        def whole(p):
            return _loss_at(model64, p, state, x64, y64)[0]

        g = jax.grad(whole)(params64)
        norm = optax.tree.norm(g)
        g2 = jax.grad(whole)(jax.tree.map(lambda w, g: w + rho * g / norm, params64, g))
        expected = jax.tree.map(lambda w, g: w - lr * g, params64, g2)
        expected_loss = whole(params64)
    assert_close(
        eqx.filter(new_model, eqx.is_inexact_array), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


@pytest.mark.slow  # 10 s
def test_with_batch_norm_threads_the_state_and_matches_two_passes(getkey):
    """The state after a step is that of four plain forward passes in turn; the
    parameters are the hand-written two-pass SAM step in which each micro-batch is
    evaluated from the state it saw."""
    model, state = eqx.nn.make_with_state(Net)(getkey(), "running")
    x, y = regression_data(getkey())
    rho, lr, m = 0.05, 0.1, 4
    opt = eqx_norm.sam(optax.sgd(lr), rho=rho)
    params = eqx.filter(model, eqx.is_inexact_array)
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, micro_batches=m))
    new_model, new_state, _, loss = step(model, clone(state), opt.init(params), x, y)

    xs, ys = x.reshape(m, -1, 4), y.reshape(m, -1, 2)
    seen, s = [], clone(state)
    losses = []
    for xi, yi in zip(xs, ys):
        seen.append(clone(s))
        li, s = mse_loss(model, clone(s), xi, yi)
        losses.append(li)
    assert_close(new_state, s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-6)

    def mean_grad(p):
        grads = [
            jax.grad(lambda p: _loss_at(model, p, si, xi, yi)[0])(p)
            for si, xi, yi in zip(seen, xs, ys)
        ]
        return jax.tree.map(lambda *g: sum(g) / m, *grads)

    g = mean_grad(params)
    norm = optax.tree.norm(g)
    g2 = mean_grad(jax.tree.map(lambda w, g: w + rho * g / norm, params, g))
    expected = jax.tree.map(lambda w, g: w - lr * g, params, g2)
    assert_close(
        eqx.filter(new_model, eqx.is_inexact_array), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.standard_promotion  # optax.adam
def test_plain_optimizer_is_gradient_accumulation(getkey):
    model, state = eqx.nn.make_with_state(Net)(getkey(), norm=False)
    x, y = regression_data(getkey())
    opt = optax.adam(1e-2)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    whole = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))
    micro = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, micro_batches=2))
    a, _, _, loss_a = whole(model, clone(state), opt_state, x, y)
    b, _, _, loss_b = micro(model, state, opt_state, x, y)
    assert_close(
        eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)


def test_aux_is_stacked_per_micro_batch(getkey):
    model, state = eqx.nn.make_with_state(Net)(getkey())
    x, y = regression_data(getkey())

    def loss_with_aux(model, state, x, y):
        loss, state = mse_loss(model, state, x, y)
        return loss, (state, jnp.mean(x))

    opt = eqx_norm.sam(optax.sgd(0.1))
    step = eqx.filter_jit(
        eqx_norm.sam_step(loss_with_aux, opt, has_aux=True, micro_batches=4)
    )
    *_, aux = step(
        model, state, opt.init(eqx.filter(model, eqx.is_inexact_array)), x, y
    )
    np.testing.assert_allclose(aux, x.reshape(4, -1, 4).mean((1, 2)), rtol=1e-6)


def test_batch_that_does_not_split_is_refused(getkey):
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = optax.sgd(0.1)
    step = eqx_norm.sam_step(mse_loss, opt, micro_batches=3)
    x, y = regression_data(getkey(), n=16)
    with pytest.raises(
        ValueError, match=r"batch of 16 examples.*3 equal micro-batches"
    ):
        step(model, state, opt.init(eqx.filter(model, eqx.is_inexact_array)), x, y)


@pytest.mark.parametrize("value", [0, -3, 2.0, True, np.bool_(True), "2"])
def test_bad_micro_batches_is_refused(value):
    with pytest.raises((ValueError, TypeError), match="micro_batches"):
        eqx_norm.sam_step(mse_loss, optax.sgd(0.1), micro_batches=value)


def _f64(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree
    )


@pytest.mark.slow  # 10 s each; other per-micro-batch tests run in the default tier
@pytest.mark.parametrize("adaptive", [False, True])
def test_per_micro_batch_perturbation_matches_float64_reference(adaptive, getkey):
    """m-sharpness on one device: micro-batch i is perturbed by its own gradient
    (from the state it saw), and the base optimizer gets the mean of the gradients
    at the m perturbed points; the state and loss are those of the first pass."""
    model, state = eqx.nn.make_with_state(Net)(getkey(), "running")
    x, y = regression_data(getkey())
    rho, lr, eta, m = 0.05, 0.1, 0.01, 4
    opt = eqx_norm.sam(optax.sgd(lr), rho=rho, adaptive=adaptive, eta=eta)
    params = eqx.filter(model, eqx.is_inexact_array)
    step = eqx.filter_jit(
        eqx_norm.sam_step(
            mse_loss, opt, micro_batches=m, perturbation="per-micro-batch"
        )
    )
    new_model, new_state, _, loss = step(model, clone(state), opt.init(params), x, y)
    whole = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, micro_batches=m))
    whole_model, whole_state, _, whole_loss = whole(
        model, clone(state), opt.init(params), x, y
    )
    assert_same(new_state, whole_state)
    np.testing.assert_array_equal(loss, whole_loss)

    with jax.enable_x64(True):
        model64, p64, s = _f64((model, params, clone(state)))
        xs, ys = _f64((x.reshape(m, -1, 4), y.reshape(m, -1, 2)))
        second = []
        # One compiled float64 gradient for all micro-batches (eager is slow).
        grad_at = jax.jit(jax.grad(lambda p, s, x, y: _loss_at(model64, p, s, x, y)[0]))
        for xi, yi in zip(xs, ys):
            grad = lambda p: grad_at(p, s, xi, yi)  # noqa: B023, E731
            g = grad(p64)
            t = jax.tree.map(lambda w: jnp.abs(w) + eta if adaptive else 1.0, p64)
            norm = optax.tree.norm(jax.tree.map(jnp.multiply, t, g))
            e = jax.tree.map(lambda t, g: rho * t * t * g / norm, t, g)
            second.append(grad(jax.tree.map(jnp.add, p64, e)))
            s = _loss_at(model64, p64, s, xi, yi)[1]
        mean_second = jax.tree.map(lambda *g: sum(g) / m, *second)
        expected = jax.tree.map(lambda w, g: w - lr * g, p64, mean_second)
    assert_close(
        eqx.filter(new_model, eqx.is_inexact_array), expected, rtol=1e-5, atol=1e-6
    )
    # Not the whole-batch step: the two perturbations differ.
    first = jax.tree.leaves(eqx.filter(whole_model, eqx.is_inexact_array))[0]
    assert not np.allclose(first, jax.tree.leaves(expected)[0], rtol=1e-6)


def test_per_micro_batch_with_a_plain_optimizer_is_gradient_accumulation(getkey):
    """The perturbation options say where a SAM-family optimizer's perturbation
    comes from; an optimizer that does not perturb makes the plain step (here,
    gradient accumulation over two micro-batches), bit for bit."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = optax.sgd(0.1)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = regression_data(getkey())
    outs = [
        eqx.filter_jit(
            eqx_norm.sam_step(mse_loss, opt, micro_batches=2, perturbation=mode)
        )(model, clone(state), opt_state, x, y)
        for mode in ("whole-batch", "per-micro-batch")
    ]
    assert_same(*outs)


def test_per_micro_batch_looksam_every_step_equals_sam(getkey):
    """LookSAM perturbing on every step is SAM, per micro-batch too: its rule goes
    through the same contract, inside its `lax.cond`."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    x, y = regression_data(getkey())
    kwargs = {"micro_batches": 4, "perturbation": "per-micro-batch"}
    sam = one_step(eqx_norm.sam(optax.sgd(0.1)), model, state, x, y, **kwargs)
    looksam = eqx_norm.looksam(optax.sgd(0.1), every=1)
    assert_close(
        one_step(looksam, model, state, x, y, **kwargs), sam, rtol=1e-6, atol=1e-7
    )


def test_per_micro_batch_refuses_an_optimizer_that_picks_its_own_point(getkey):
    """A variant that calls `grad_fn` at a point of its own cannot be perturbed per
    micro-batch: a clear error that names `perturbed_gradient`, state unchanged."""

    def own_point(updates, state, params, *, grad_fn, **extra):
        return grad_fn(params), state

    opt = optax.GradientTransformationExtraArgs(
        optax.identity().init,
        own_point,  # pyright: ignore[reportArgumentType]
    )
    model, state = eqx.nn.make_with_state(Net)(getkey())
    before = leaves(state)
    step = eqx_norm.sam_step(
        mse_loss, opt, micro_batches=2, perturbation="per-micro-batch"
    )
    x, y = regression_data(getkey())
    with pytest.raises(ValueError, match="perturbed_gradient"):
        step(model, state, optax.EmptyState(), x, y)
    assert_same(state, before)


def test_micro_batches_accepts_numpy_integers(getkey):
    """`micro_batches=np.int64(2)` was refused as "not a positive int", where the
    layer and LookSAM take NumPy integers: it is the same step as `2`."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = eqx_norm.sam(optax.sgd(0.1))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = regression_data(getkey())
    outs = [
        eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, micro_batches=m))(
            model, clone(state), opt_state, x, y
        )
        for m in (2, np.int64(2), np.uint8(2))
    ]
    for other in outs[1:]:
        assert_same(outs[0], other)


def test_micro_batches_refuse_arrays_of_different_lengths(getkey):
    """8 examples and 2 labels: each array used to be split on its own, and one
    label broadcast over four examples. Now a `ValueError` naming both sizes."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = eqx_norm.sam(optax.sgd(0.1))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = regression_data(getkey(), n=8)
    before = leaves(state)
    step = eqx_norm.sam_step(mse_loss, opt, micro_batches=2)
    with pytest.raises(ValueError, match=r"different leading sizes \[2, 8\]"):
        step(model, state, opt_state, x, y[:2])
    assert_same(state, before)


def test_unknown_perturbation_is_refused():
    # Under the test suite's runtime type checks the Literal annotation refuses it
    # first; without them, the step's own check does.
    with pytest.raises((ValueError, TypeError), match="perturbation"):
        eqx_norm.sam_step(
            mse_loss,
            optax.sgd(0.1),
            perturbation="per-example",  # pyright: ignore[reportArgumentType]
        )


def test_a_scalar_in_the_batch_is_given_to_every_micro_batch(getkey):
    """`step(..., x, y, 3.0)` with micro-batches failed in `lax.scan` ("no leading
    axis"): a scalar of the batch now reaches every micro-batch whole, and the step
    equals gradient accumulation written out."""

    def scaled_loss(model, state, x, y, scale):
        loss, state = mse_loss(model, state, x, y)
        return scale * loss, state

    model, state = eqx.nn.make_with_state(Net)(getkey(), norm=False)
    opt = optax.sgd(0.1)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x, y = regression_data(getkey())
    step = eqx.filter_jit(eqx_norm.sam_step(scaled_loss, opt, micro_batches=2))
    new_model, _, _, loss = step(model, clone(state), opt.init(params), x, y, 3.0)

    def loss_at(p, x, y):
        return scaled_loss(eqx.combine(p, static), clone(state), x, y, 3.0)[0]

    grads = [jax.grad(loss_at)(params, x[i : i + 8], y[i : i + 8]) for i in (0, 8)]
    expected = jax.tree.map(lambda w, a, b: w - 0.1 * (a + b) / 2, params, *grads)
    assert_close(eqx.filter(new_model, eqx.is_inexact_array), expected, rtol=1e-5)
    np.testing.assert_allclose(
        loss, 3.0 * mse_loss(model, clone(state), x, y)[0], rtol=1e-5
    )


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_an_empty_batch_is_refused(micro_batches, getkey):
    """An empty batch gave a NaN loss and NaN parameters, with SAM or without."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = eqx_norm.sam(optax.sgd(0.1))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = regression_data(getkey())
    step = eqx_norm.sam_step(mse_loss, opt, micro_batches=micro_batches)
    before = leaves(clone(state))
    with pytest.raises(ValueError, match="empty batch"):
        step(model, state, opt_state, x[:0], y[:0])
    assert_same(state, before)


@pytest.mark.parametrize("batch", [(3.0,), ()], ids=["only-scalars", "no-batch"])
def test_micro_batches_without_a_batch_array_names_micro_batches(batch, getkey):
    """Regression: `sam_step(micro_batches=2)` given only scalars, or no batch,
    failed inside `lax.scan` with "scan got no values to scan over"."""

    def loss_fn(model, state, *extra):
        x, _ = regression_data(jax.random.key(0))
        return mse_loss(model, state, x, jnp.zeros((16, 2)))

    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = eqx_norm.sam(optax.sgd(0.1))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    before = leaves(clone(state))
    got = "only scalars" if batch else "no batch"
    with pytest.raises(ValueError, match=rf"`sam_step\(micro_batches=2\)`.*got {got}"):
        eqx_norm.sam_step(loss_fn, opt, micro_batches=2)(
            model, state, opt_state, *batch
        )
    assert_same(state, before)
