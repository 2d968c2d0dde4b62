from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_norm

from ..helpers import (
    Net,
    as_a_user_calls_it,
    assert_same,
    clone,
    counting,
    leaves,
    mse_loss,
    regression_data,
)

# The closed-form loss of tests/test_sam.py: L(w) = sum(c w^2 / 2 + d w^4 / 4).
SHAPES = {"a": (4, 3), "b": (3,), "c": (2, 2, 2)}


def _problem(key):
    keys = jax.random.split(key, 3 * len(SHAPES))
    params, c, d = {}, {}, {}
    for i, (k, s) in enumerate(SHAPES.items()):
        params[k] = jax.random.normal(keys[3 * i], s)
        c[k] = 0.5 + jax.random.uniform(keys[3 * i + 1], s)
        d[k] = jax.random.uniform(keys[3 * i + 2], s)
    return params, c, d


def _grad(params, c, d):
    return jax.tree.map(lambda w, c, d: c * w + d * w**3, params, c, d)


def _f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _norm(tree):
    return np.sqrt(sum(np.sum(v**2) for v in tree.values()))


def _authors_sgd_msam(w, c, d, lr, mu, rho, steps):
    """The authors' `MSAM.step` (optimizer/msam.py, weight decay 0) in float64: the
    parameters it holds are the perturbed ones, moved back before each SGD step
    and up again after it. Returns, per step, (unperturbed, perturbed)."""
    p = dict(w)
    buf = {k: np.zeros_like(v) for k, v in w.items()}
    inverse_norm = 0.0
    history = []
    for _ in range(steps):
        g = {k: c[k] * p[k] + d[k] * p[k] ** 3 for k in p}  # at the held point
        for k in p:
            p[k] = p[k] + rho * inverse_norm * buf[k]  # back to unperturbed
            buf[k] = mu * buf[k] + g[k]
            p[k] = p[k] - lr * buf[k]
        inverse_norm = 1 / (_norm(buf) + 1e-12)
        p = {k: p[k] - rho * inverse_norm * buf[k] for k in p}  # ascent
        history.append(({k: p[k] + rho * inverse_norm * buf[k] for k in p}, dict(p)))
    return history


def _authors_adamw_msam(w, c, d, lr, b1, b2, eps, rho, steps):
    """The authors' `AdamW_MSAM.step` (optimizer/adamW_msam.py, weight decay 0) in
    float64, as above."""
    p = dict(w)
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    norm_factor = 0.0
    history = []
    for t in range(1, steps + 1):
        g = {k: c[k] * p[k] + d[k] * p[k] ** 3 for k in p}
        for k in p:
            p[k] = p[k] + norm_factor * m[k]
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(v[k]) / np.sqrt(1 - b2**t) + eps
            p[k] = p[k] - lr / (1 - b1**t) * m[k] / denom
        norm_factor = rho / (_norm(m) + 1e-12)
        p = {k: p[k] - norm_factor * m[k] for k in p}
        history.append(({k: p[k] + norm_factor * m[k] for k in p}, dict(p)))
    return history


def _run(opt, params, c, d, steps):
    """`steps` updates, each with the gradient at `eqx_norm.pass_point`, as a
    training loop written by hand does. Returns, per step, (parameters, point of
    the next pass)."""

    @jax.jit
    def step(params, state):
        grads = _grad(eqx_norm.pass_point(state, params), c, d)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, state

    state = opt.init(params)
    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append((params, eqx_norm.pass_point(state, params)))
    return history


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_against_the_authors_sgd_algorithm(rho, getkey):
    lr, mu = 0.05, 0.9
    params, c, d = _problem(getkey())
    ours = _run(eqx_norm.msam(optax.sgd(lr, momentum=mu), rho=rho), params, c, d, 20)
    theirs = _authors_sgd_msam(_f64(params), _f64(c), _f64(d), lr, mu, rho, 20)
    for (w, at), (w64, at64) in zip(ours, theirs):
        for k in SHAPES:
            np.testing.assert_allclose(w[k], w64[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(at[k], at64[k], rtol=1e-5, atol=1e-6)
    # The perturbation has length rho.
    w, at = ours[-1]
    e = {k: np.asarray(at[k], np.float64) - np.asarray(w[k], np.float64) for k in w}
    np.testing.assert_allclose(_norm(e), rho, rtol=1e-4)


@pytest.mark.standard_promotion  # optax.adam
def test_against_the_authors_adamw_algorithm(getkey):
    lr, b1, b2, eps, rho = 0.01, 0.9, 0.999, 1e-8, 1.0
    params, c, d = _problem(getkey())
    opt = eqx_norm.msam(optax.adam(lr, b1=b1, b2=b2, eps=eps), rho=rho)
    ours = _run(opt, params, c, d, 20)
    theirs = _authors_adamw_msam(
        _f64(params), _f64(c), _f64(d), lr, b1, b2, eps, rho, 20
    )
    for (w, at), (w64, at64) in zip(ours, theirs):
        for k in SHAPES:
            np.testing.assert_allclose(w[k], w64[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(at[k], at64[k], rtol=1e-5, atol=1e-6)


def test_rho_schedule_is_evaluated_at_the_step_that_takes_the_gradient(getkey):
    lr, mu = 0.05, 0.9
    schedule = optax.linear_schedule(0.5, 0.0, transition_steps=4)
    params, c, d = _problem(getkey())
    ours = _run(
        eqx_norm.msam(optax.sgd(lr, momentum=mu), rho=schedule), params, c, d, 6
    )
    w, buf = _f64(params), {k: np.zeros(s) for k, s in SHAPES.items()}
    c64, d64 = _f64(c), _f64(d)
    e = {k: np.zeros(s) for k, s in SHAPES.items()}
    for t in range(6):
        p = {k: w[k] + e[k] for k in w}
        buf = {k: mu * buf[k] + c64[k] * p[k] + d64[k] * p[k] ** 3 for k in w}
        w = {k: w[k] - lr * buf[k] for k in w}
        rho_next = max(0.5 * (1 - (t + 1) / 4), 0.0)
        e = {k: -rho_next * buf[k] / (_norm(buf) + 1e-12) for k in w}
        for k in SHAPES:
            np.testing.assert_allclose(ours[t][0][k], w[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ours[t][1][k], w[k] + e[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- sam_step


def test_one_pass_per_step_at_the_perturbed_point(getkey):
    """Through `sam_step`: one forward and backward pass per step, at `w + e`; the
    BatchNorm state is that of a plain step at the perturbed point; the parameters
    returned are the unperturbed ones, updated by SGD with the gradient there; the
    next perturbation is -rho v / ||v||."""
    lr, mu, rho = 0.1, 0.9, 0.2
    model, state = eqx.nn.make_with_state(Net)(getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = eqx_norm.msam(optax.sgd(lr, momentum=mu), rho=rho)
    counted, passes = counting(mse_loss)
    step = eqx.filter_jit(eqx_norm.sam_step(counted, opt))
    plain = eqx.filter_jit(eqx_norm.sam_step(mse_loss, optax.sgd(lr)))
    grad_at = eqx.filter_jit(
        lambda p, s, x, y: jax.grad(
            lambda p: mse_loss(eqx.combine(p, static), s, x, y)[0]
        )(p)
    )
    opt_state = opt.init(params)
    buf = jax.tree.map(jnp.zeros_like, params)
    for t in range(3):
        x, y = regression_data(getkey())
        at = eqx.combine(eqx_norm.pass_point(opt_state, params), static)
        if t == 0:
            assert eqx.tree_equal(at, model)  # no momentum yet: no perturbation
        model, new_state, opt_state, loss = step(model, clone(state), opt_state, x, y)
        assert len(passes) == 1  # traced once, one pass in the program

        _, plain_state, _, plain_loss = plain(
            at, clone(state), optax.sgd(lr).init(params), x, y
        )
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(plain_state)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)

        g = grad_at(eqx.filter(at, eqx.is_inexact_array), clone(state), x, y)
        buf = jax.tree.map(lambda b, g: mu * b + g, buf, g)
        params = jax.tree.map(lambda w, b: w - lr * b, params, buf)
        for a, b in zip(
            jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)),
            jax.tree.leaves(params),
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        params = eqx.filter(model, eqx.is_inexact_array)
        e = opt_state.next.perturbation
        norm = optax.tree.norm(buf)
        for a, b in zip(jax.tree.leaves(e), jax.tree.leaves(buf)):
            np.testing.assert_allclose(a, -rho * b / norm, rtol=1e-4, atol=1e-7)
        state = new_state


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize(
    "base",
    [lambda: optax.sgd(0.1, momentum=0.9), lambda: optax.adam(1e-2)],
    ids=["sgd", "adam"],
)
def test_rho_zero_is_the_base_optimizer_bit_for_bit(base, getkey):
    model, state = eqx.nn.make_with_state(Net)(getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    runs = []
    for opt in (eqx_norm.msam(base(), rho=0.0), base()):
        step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))
        trio = (model, clone(state), opt.init(params))
        keys = iter(jax.random.split(jax.random.key(3), 5))
        for _ in range(5):
            *trio, _ = step(*trio, *regression_data(next(keys)))
        runs.append(trio[:2])
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.standard_promotion  # optax.inject_hyperparams
def test_inside_chain_and_inject_hyperparams(getkey):
    lr, mu = 0.05, 0.9
    params, c, d = _problem(getkey())
    plain = _run(eqx_norm.msam(optax.sgd(lr, momentum=mu), rho=0.3), params, c, d, 5)
    variants = {
        "chained": optax.chain(
            optax.identity(), eqx_norm.msam(optax.sgd(lr, momentum=mu), rho=0.3)
        ),
        "injected rho": optax.inject_hyperparams(eqx_norm.msam)(
            base_optimizer=optax.sgd(lr, momentum=mu), rho=0.3
        ),
        "injected base": eqx_norm.msam(
            optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=mu),
            rho=0.3,
        ),
    }
    for name, opt in variants.items():
        ours = _run(opt, params, c, d, 5)
        for k in SHAPES:
            np.testing.assert_allclose(
                ours[-1][0][k], plain[-1][0][k], rtol=1e-6, err_msg=name
            )
            np.testing.assert_allclose(
                ours[-1][1][k], plain[-1][1][k], rtol=1e-6, err_msg=name
            )
    # An injected rho changed during training takes effect at the next perturbation.
    opt = variants["injected rho"]
    state = cast(Any, opt.init(params))
    state.hyperparams["rho"] = jnp.asarray(0.1)
    state = cast(Any, opt.update(_grad(params, c, d), state, params)[1])
    e = state.inner_state.next.perturbation
    np.testing.assert_allclose(float(optax.tree.norm(e)), 0.1, rtol=1e-5)


@pytest.mark.parametrize(
    "base",
    [
        optax.sgd(0.1),
        optax.rmsprop(0.1),
        optax.chain(optax.trace(0.9), optax.sgd(0.1, momentum=0.9)),
    ],
    ids=["sgd without momentum", "rmsprop", "two momenta"],
)
def test_a_base_without_one_momentum_is_refused_at_init(base):
    opt = eqx_norm.msam(base)
    with pytest.raises(ValueError, match=r"momentum in the state of `base_optimizer`"):
        opt.init({"w": jnp.ones(3)})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"rho": -0.1}, ValueError, "`rho` must be finite and at least 0"),
        ({"rho": float("nan")}, ValueError, "`rho` must be finite and at least 0"),
        ({"rho": np.inf}, ValueError, "`rho` must be finite and at least 0"),
        ({"rho": jnp.asarray(-1.0)}, ValueError, "`rho` must be finite"),
        ({"rho": True}, TypeError, "`rho` must be a real scalar or a schedule"),
        ({"rho": jnp.ones(2)}, TypeError, "`rho` must be a real scalar"),
        # jaxtyping's runtime check (in the tests) raises a TypeError naming it first.
        ({"base_optimizer": lambda x: x}, (ValueError, TypeError), "base_optimizer"),
    ],
    ids=["negative", "nan", "inf", "negative-array", "bool", "vector", "base"],
)
def test_bad_hyperparameters_are_refused(kwargs, error, message):
    kwargs = {"base_optimizer": optax.sgd(0.1, momentum=0.9)} | kwargs
    with pytest.raises(error, match=message):
        eqx_norm.msam(**kwargs)


def test_micro_batches_take_their_passes_at_the_perturbed_point(getkey):
    """With `micro_batches=2` each micro-batch's one pass is at `w + e`: the step
    equals plain gradient accumulation from the perturbed model, applied to the
    unperturbed parameters."""
    lr, mu, rho = 0.1, 0.9, 0.2
    model, state = eqx.nn.make_with_state(Net)(getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = eqx_norm.msam(optax.sgd(lr, momentum=mu), rho=rho)
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, micro_batches=2))
    x, y = regression_data(getkey())
    trio = step(model, clone(state), opt.init(params), x, y)[:3]  # a momentum now
    model, state, opt_state = trio
    params = eqx.filter(model, eqx.is_inexact_array)
    at = eqx.combine(eqx_norm.pass_point(opt_state, params), static)
    x, y = regression_data(getkey())
    new_model, new_state, _, _ = step(model, clone(state), opt_state, x, y)
    plain = eqx.filter_jit(eqx_norm.sam_step(mse_loss, optax.sgd(1.0), micro_batches=2))
    moved, plain_state, _, _ = plain(
        at, clone(state), optax.sgd(1.0).init(params), x, y
    )
    g = jax.tree.map(
        lambda a, b: a - b,
        eqx.filter(at, eqx.is_inexact_array),
        eqx.filter(moved, eqx.is_inexact_array),
    )
    buf = jax.tree.map(lambda b, g: mu * b + g, opt_state.base_state[0].trace, g)
    expected = jax.tree.map(lambda w, b: w - lr * b, params, buf)
    for a, b in zip(
        jax.tree.leaves(eqx.filter(new_model, eqx.is_inexact_array)),
        jax.tree.leaves(expected),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(plain_state)):
        np.testing.assert_array_equal(a, b)


def _cosine(a, b) -> float:
    a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)]).astype(np.float64)
    b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)]).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "base",
    [
        optax.sgd(0.1, momentum=0.9),
        optax.rmsprop(0.01, momentum=0.9),
        optax.rmsprop(0.01, momentum=0.9, centered=True),
        optax.lars(0.1),
        optax.chain(optax.scale_by_learning_rate(0.1), optax.trace(0.9)),
    ],
    ids=["sgd", "rmsprop", "centred-rmsprop", "lars", "lr-then-trace"],
)
def test_the_perturbation_points_along_the_step_for_every_momentum(base, getkey):
    """Regression: around an optimizer whose momentum is kept after the learning
    rate's negative scale (`optax.rmsprop(momentum=...)`, `optax.lars`, a trace
    after `scale_by_learning_rate`) the perturbation pointed against the step just
    taken (cosine -1.0; +1.0 with `optax.sgd`). For these optimizers the update is
    a multiple of the momentum, so the cosine must be +1 for every one, and the
    perturbation's length is `rho`."""
    params, c, d = _problem(getkey())
    opt = eqx_norm.msam(base, rho=0.3)
    state: Any = opt.init(params)
    for _ in range(3):
        at = eqx_norm.pass_point(state, params)
        updates, state = opt.update(_grad(at, c, d), state, params)
        params = optax.apply_updates(params, updates)
        e = state.next.perturbation
        np.testing.assert_allclose(_cosine(e, updates), 1.0, atol=1e-5)
        np.testing.assert_allclose(float(optax.tree.norm(e)), 0.3, rtol=1e-5)


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize(
    "partly_frozen",
    [
        lambda: optax.masked(optax.adam(1e-2), {"a": True, "b": True, "c": False}),
        lambda: optax.multi_transform(
            {"train": optax.adam(1e-2), "freeze": optax.set_to_zero()},
            {"a": "train", "b": "train", "c": "freeze"},
        ),
        lambda: optax.multi_transform(
            {"fast": optax.adam(1e-2), "slow": optax.sgd(1e-3, momentum=0.9)},
            {"a": "fast", "b": "slow", "c": "slow"},
        ),
    ],
    ids=["masked", "multi_transform-frozen", "multi_transform-two-momenta"],
)
def test_a_partly_frozen_base_optimizer_perturbs_what_it_trains(partly_frozen, getkey):
    """Regression: around `optax.masked` or `optax.multi_transform` the state was
    made, and the first update failed with "pytree structure error: different
    types at key path ... MaskedNode". Parameters the base optimizer leaves out
    are not perturbed; the others along their own momentum (two optimizers, two
    momenta: each parameter has one), with the norm over them all."""
    params, c, d = _problem(getkey())
    opt = eqx_norm.msam(partly_frozen(), rho=0.3)
    state: Any = opt.init(params)
    for _ in range(2):
        at = eqx_norm.pass_point(state, params)
        updates, state = opt.update(_grad(at, c, d), state, params)
        params = optax.apply_updates(params, updates)
    e = state.next.perturbation
    np.testing.assert_allclose(float(optax.tree.norm(e)), 0.3, rtol=1e-5)
    base_state = state.base_state
    if isinstance(base_state, optax.MaskedState) or "freeze" in getattr(
        base_state, "inner_states", {}
    ):
        np.testing.assert_array_equal(e["c"], 0)
        inner = jax.tree.leaves(
            base_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        mu: Any = next(x for x in inner if isinstance(x, optax.ScaleByAdamState)).mu
        trained = {"a": mu["a"], "b": mu["b"]}
        scale = 0.3 / float(optax.tree.norm(trained))
        for k in ("a", "b"):
            np.testing.assert_allclose(e[k], -scale * mu[k], rtol=1e-5, atol=1e-7)
    else:
        assert all(float(jnp.abs(v).sum()) > 0 for v in e.values())


def test_a_momentum_that_a_first_update_leaves_at_zero_is_refused():
    """A learning rate of 0 at the first step (a warm-up from 0) scales a momentum
    kept after it away, so its direction cannot be read: refused at `init`, naming
    `base_optimizer` and the fix."""
    warmup = optax.linear_schedule(0.0, 0.1, 10)
    opt = eqx_norm.msam(optax.rmsprop(warmup, momentum=0.9))
    with pytest.raises(ValueError, match=r"which way the momentum of `base_optimizer`"):
        opt.init({"w": jnp.ones(3)})
    # A momentum kept before the learning rate (optax.sgd) is fine with it.
    eqx_norm.msam(optax.sgd(warmup, momentum=0.9)).init({"w": jnp.ones(3)})


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "rho, error, message",
    [
        ("0.3", TypeError, r"`rho` must be a real scalar or a schedule, got '0\.3'"),
        (None, TypeError, r"`rho` must be a real scalar or a schedule, got None"),
        ([0.3], TypeError, r"`rho` must be a real scalar or a schedule, got \[0\.3\]"),
        (np.bool_(True), TypeError, r"`rho` must be a real scalar or a schedule"),
        (0.3 + 1j, ValueError, r"`rho` must be finite and at least 0"),
        (np.float32("nan"), ValueError, r"`rho` must be finite and at least 0"),
        (np.float64(-0.3), ValueError, r"`rho` must be finite and at least 0"),
        (1e39, ValueError, r"`rho` must be finite in float32"),
    ],
    ids=[
        "string",
        "none",
        "list",
        "numpy-bool",
        "complex",
        "numpy-nan",
        "numpy-negative",
        "infinite-in-float32",
    ],
)
def test_msam_refuses_a_rho_that_is_not_a_radius(rho, error, message):
    """Each is refused when the optimizer is made, as a user without the suite's
    type checks sees it, naming `rho` and a value that works."""
    with as_a_user_calls_it(), pytest.raises(error, match=message + r".*`rho=0\.3`"):
        eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=rho)


@pytest.mark.parametrize(
    "base",
    [None, optax.sgd, optax.MultiSteps(optax.sgd(0.1, momentum=0.9), 2), "sgd"],
    ids=["none", "the-factory-not-called", "multi-steps-inside", "string"],
)
def test_msam_refuses_a_base_that_is_not_a_gradient_transformation(base):
    with (
        as_a_user_calls_it(),
        pytest.raises(
            ValueError,
            match=r"`base_optimizer` must be an Optax gradient transformation, e\.g\. "
            r"`eqx_norm\.msam\(optax\.sgd\(0\.1, momentum=0\.9\), rho=0\.3\)`; got",
        ),
    ):
        eqx_norm.msam(base)


def test_a_rho_traced_under_filter_jit_that_is_negative_stops_the_update(getkey):
    """A `rho` passed into a jitted function is traced, so it is checked when the
    update runs; the parameters given to it are unchanged."""
    params, c, d = _problem(getkey())
    before = leaves(params)

    @eqx.filter_jit
    def update(rho, params):
        opt = eqx_norm.msam(optax.sgd(0.05, momentum=0.9), rho=rho)
        return opt.update(_grad(params, c, d), opt.init(params), params)

    with pytest.raises(
        eqx.EquinoxRuntimeError,
        match=r"`eqx_norm\.msam`: `rho` is NaN, infinite or negative at this update",
    ):
        update(jnp.asarray(-1.0), params)
    assert_same(params, before)


def test_an_injected_nan_rho_stops_a_sam_step(getkey):
    """`optax.inject_hyperparams(eqx_norm.msam)` with a NaN written into its state:
    the step stops before it changes anything."""
    opt = optax.inject_hyperparams(eqx_norm.msam, static_args="base_optimizer")(
        optax.sgd(0.1, momentum=0.9), rho=0.3
    )
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt_state: Any = opt.init(eqx.filter(model, eqx.is_inexact_array))
    opt_state.hyperparams["rho"] = jnp.asarray(jnp.nan)
    before = leaves((model, state, opt_state))
    with pytest.raises(
        eqx.EquinoxRuntimeError, match=r"`eqx_norm\.msam`: `rho` is NaN.*inject_hyp"
    ):
        eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))(
            model, state, opt_state, *regression_data(getkey())
        )
    assert_same((model, state, opt_state), before)


def _bad_msam_step(case, model, params) -> tuple[Any, dict[str, Any], Any, slice]:
    """A bad `sam_step` call with Momentum-SAM, as `(optimizer, step options,
    opt_state, rows of the batch)`."""
    opt = eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    good = cast(eqx_norm.MSAMState, opt.init(params))
    options: dict[str, Any] = {}
    rows, opt_state = slice(None), good
    if case == "empty-batch":
        rows = slice(0, 0)
    elif case == "micro-batches-that-do-not-split":
        options["micro_batches"] = 3
    elif case == "opt-state-of-sam":
        opt_state = eqx_norm.sam(optax.sgd(0.1, momentum=0.9)).init(params)
    elif case == "state-without-its-next-perturbation":
        opt_state = good._replace(next=good.next.perturbation)
    else:  # the state of a model with a wider last layer
        wider = eqx.tree_at(
            lambda m: m.layers[3], model, eqx.nn.Linear(6, 3, key=jax.random.key(1))
        )
        opt_state = opt.init(eqx.filter(wider, eqx.is_inexact_array))
    return opt, options, opt_state, rows


_BAD_STEPS = {
    "empty-batch": r"empty batch.*Skip empty batches",
    "micro-batches-that-do-not-split": r"`sam_step\(micro_batches=3\)` got a batch "
    r"of 16 examples",
    "opt-state-of-sam": r"`opt_state` is not a state.*SAMState",
    "state-without-its-next-perturbation": r"`opt_state` is not a state.*"
    r"`opt_state\.next\.perturbation",
    "opt-state-of-another-model": r"at `opt_state\.next\.perturbation\.layers\."
    r"layers\[3\]\.weight` the optimizer makes an array float32\[2, 6\], but the "
    r"step got an array float32\[3, 6\]",
}


@pytest.mark.parametrize("case", list(_BAD_STEPS))
def test_sam_step_with_msam_refuses_a_bad_step(case, getkey):
    """Refused when the step is traced, naming what to change; the model, its
    state and the optimizer state are unchanged."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    opt, options, opt_state, rows = _bad_msam_step(case, model, params)
    x, y = regression_data(getkey())
    before = leaves((model, state, opt_state))
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, **options))
    with pytest.raises(ValueError, match=_BAD_STEPS[case]):
        step(model, state, opt_state, x[rows], y[rows])
    assert_same((model, state, opt_state), before)


@pytest.mark.parametrize(
    "base, params",
    [
        (
            optax.masked(optax.sgd(0.1, momentum=0.9), {"w": False, "b": False}),
            {"w": jnp.ones(3), "b": jnp.ones(2)},
        ),
        (optax.sgd(0.1, momentum=0.9), {}),
    ],
    ids=["masked-leaves-every-parameter-out", "no-parameters"],
)
def test_msam_names_a_base_that_keeps_no_momentum_for_any_parameter(base, params):
    before = leaves(params)
    with pytest.raises(
        ValueError, match=r"`base_optimizer`.*(for no parameter|every parameter)"
    ) as error:
        eqx_norm.msam(base, rho=0.3).init(params)
    assert "warm-up" not in str(error.value)
    assert_same(params, before)


@pytest.mark.parametrize(
    "schedule",
    [lambda count: jnp.full(2, 0.3), lambda count: "0.3"],
    ids=["a-vector", "a-string"],
)
def test_a_rho_schedule_that_returns_no_scalar_names_rho(schedule, getkey):
    params, c, d = _problem(getkey())
    opt = eqx_norm.msam(optax.sgd(0.05, momentum=0.9), rho=schedule)
    opt_state = opt.init(params)
    before = leaves((params, opt_state))
    with pytest.raises(TypeError, match=r"`rho`.*schedule.*(scalar|number)"):
        opt.update(_grad(params, c, d), opt_state, params)
    assert_same((params, opt_state), before)


def test_per_micro_batch_perturbation_with_msam_is_refused(getkey):
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    before = leaves((model, state, opt_state))
    step = eqx_norm.sam_step(
        mse_loss, opt, micro_batches=2, perturbation="per-micro-batch"
    )
    with pytest.raises(ValueError, match=r'`perturbation="per-micro-batch"`.*msam'):
        eqx.filter_jit(step)(model, state, opt_state, *regression_data(getkey()))
    assert_same((model, state, opt_state), before)


def test_micro_batches_of_one_example_name_micro_batches(getkey):
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    before = leaves((model, state, opt_state))
    step = eqx_norm.sam_step(mse_loss, opt, micro_batches=16)
    with pytest.raises(ValueError, match=r"micro_batches=16.*one example"):
        eqx.filter_jit(step)(model, state, opt_state, *regression_data(getkey()))
    assert_same((model, state, opt_state), before)


def test_msam_inside_optax_masked_equals_msam_around_it(getkey):
    """Momentum-SAM inside `optax.masked` perturbs what it trains, as Momentum-SAM
    around a masked base optimizer does (the documented way): the same steps."""
    params, c, d = _problem(getkey())
    mask = {"a": True, "b": True, "c": False}
    inside = optax.masked(eqx_norm.msam(optax.sgd(0.05, momentum=0.9), 0.3), mask)
    around = eqx_norm.msam(optax.masked(optax.sgd(0.05, momentum=0.9), mask), 0.3)
    ours, theirs = _run(inside, params, c, d, 3), _run(around, params, c, d, 3)
    for (w, at), (w1, at1) in zip(ours, theirs):
        assert_same((w, at), (w1, at1))
