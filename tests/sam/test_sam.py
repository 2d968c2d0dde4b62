from typing import Any, NamedTuple, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_norm

from ..helpers import (
    Net,
    apply,
    as_a_user_calls_it,
    assert_close,
    assert_same,
    clone,
    counting,
    docs_variant,
    leaves,
    mse_loss,
    one_step,
    regression_data,
)

APPROACHES = list(eqx_norm.APPROACHES)


# A smooth non-quadratic loss whose gradient is known in closed form, so that the
# float64 NumPy reference needs no autodiff: L(w) = sum(c w^2 / 2 + d w^4 / 4).
def _coefficients(key, shapes):
    keys = jax.random.split(key, 2 * len(shapes))
    c = {
        k: 0.5 + jax.random.uniform(keys[2 * i], s)
        for i, (k, s) in enumerate(shapes.items())
    }
    d = {
        k: jax.random.uniform(keys[2 * i + 1], s)
        for i, (k, s) in enumerate(shapes.items())
    }
    return c, d


def _grad(params, c, d):
    return jax.tree.map(lambda w, c, d: c * w + d * w**3, params, c, d)


SHAPES = {"a": (4, 3), "b": (3,), "c": (2, 2, 2)}


def _params(key):
    keys = jax.random.split(key, len(SHAPES))
    return {k: jax.random.normal(kk, s) for kk, (k, s) in zip(keys, SHAPES.items())}


def _numpy_sam_step(w, c, d, rho, lr, adaptive=False, eta=0.01, mask=None):
    """One SAM/ASAM step with plain SGD, in float64, from the formulas."""
    keys = list(w)
    g = {k: c[k] * w[k] + d[k] * w[k] ** 3 for k in keys}
    m = {k: (1.0 if mask is None else float(mask[k])) for k in keys}
    t = {k: (np.abs(w[k]) + eta if adaptive else np.ones_like(w[k])) for k in keys}
    tg = {k: t[k] * g[k] * m[k] for k in keys}
    norm = np.sqrt(sum(np.sum(v**2) for v in tg.values()))
    e = {k: rho * t[k] * tg[k] / norm for k in keys}
    p = {k: w[k] + e[k] for k in keys}
    g2 = {k: c[k] * p[k] + d[k] * p[k] ** 3 for k in keys}
    return {k: w[k] - lr * g2[k] for k in keys}


def _run(opt, params, c, d, steps) -> list[Any]:
    state = opt.init(params)
    grad_fn = lambda p: _grad(p, c, d)  # noqa: E731

    @jax.jit
    def step(params, state):
        updates, state = opt.update(_grad(params, c, d), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append(params)
    return history


@pytest.mark.standard_promotion
@pytest.mark.parametrize(
    "base", [optax.sgd(0.05, momentum=0.9), optax.adam(1e-2)], ids=["sgd", "adam"]
)
def test_sam_equals_optax_contrib_sam(base, getkey):
    """20 steps against optax.contrib.sam in opaque mode with one adversarial step
    (sync_period=2) and normalised SGD as the adversarial optimizer."""
    rho = 0.05
    params = _params(getkey())
    c, d = _coefficients(getkey(), SHAPES)
    ours = _run(eqx_norm.sam(base, rho=rho), params, c, d, 20)
    theirs_opt = optax.contrib.sam(
        base,
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    state = theirs_opt.init(params)
    grad_fn = lambda p, _: _grad(p, c, d)  # noqa: E731
    p: Any = params
    for t in range(20):
        updates, state = theirs_opt.update(_grad(p, c, d), state, p, grad_fn=grad_fn)
        p = optax.apply_updates(p, updates)
        for k in SHAPES:
            np.testing.assert_allclose(ours[t][k], p[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_against_float64_formulas(adaptive, masked, getkey):
    rho, lr, eta = 0.1, 0.05, 0.02
    mask = {"a": True, "b": False, "c": True} if masked else None
    params = _params(getkey())
    c, d = _coefficients(getkey(), SHAPES)
    opt = eqx_norm.sam(optax.sgd(lr), rho=rho, adaptive=adaptive, eta=eta, mask=mask)
    ours = _run(opt, params, c, d, 5)
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    c64 = {k: np.asarray(v, np.float64) for k, v in c.items()}
    d64 = {k: np.asarray(v, np.float64) for k, v in d.items()}
    for t in range(5):
        w = _numpy_sam_step(w, c64, d64, rho, lr, adaptive, eta, mask)
        for k in SHAPES:
            np.testing.assert_allclose(ours[t][k], w[k], rtol=1e-5, atol=1e-6)
    if masked:
        # A callable mask gives the same as the pytree.
        as_callable = eqx_norm.sam(
            optax.sgd(lr), rho=rho, adaptive=adaptive, eta=eta, mask=lambda p: mask
        )
        again = _run(as_callable, params, c, d, 5)
        for k in SHAPES:
            np.testing.assert_array_equal(again[-1][k], ours[-1][k])


def test_rho_schedule(getkey):
    lr = 0.05
    schedule = optax.linear_schedule(0.2, 0.0, transition_steps=4)
    params = _params(getkey())
    c, d = _coefficients(getkey(), SHAPES)
    ours = _run(eqx_norm.sam(optax.sgd(lr), rho=schedule), params, c, d, 6)
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    c64 = {k: np.asarray(v, np.float64) for k, v in c.items()}
    d64 = {k: np.asarray(v, np.float64) for k, v in d.items()}
    for t in range(6):
        rho_t = max(0.2 * (1 - t / 4), 0.0)
        if rho_t == 0:
            g = {k: c64[k] * w[k] + d64[k] * w[k] ** 3 for k in w}
            w = {k: w[k] - lr * g[k] for k in w}
        else:
            w = _numpy_sam_step(w, c64, d64, rho_t, lr)
        for k in SHAPES:
            np.testing.assert_allclose(ours[t][k], w[k], rtol=1e-5, atol=1e-6)


def test_clipping_acts_on_the_applied_gradient(getkey):
    """Clipping in the base optimizer clips the perturbed gradient, not the
    perturbation direction: the perturbation still has norm rho."""
    rho, lr, clip = 0.1, 0.5, 0.01
    params = _params(getkey())
    c, d = _coefficients(getkey(), SHAPES)
    base = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr))
    ours = _run(eqx_norm.sam(base, rho=rho), params, c, d, 1)[0]
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    g = {k: np.asarray(v, np.float64) for k, v in _grad(params, c, d).items()}
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    p = {k: w[k] + rho * g[k] / norm for k in w}
    g2 = {k: np.asarray(v, np.float64) for k, v in _grad(p, c, d).items()}
    norm2 = np.sqrt(sum(np.sum(v**2) for v in g2.values()))
    for k in w:
        expected = w[k] - lr * g2[k] * min(1.0, clip / norm2)
        np.testing.assert_allclose(ours[k], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.standard_promotion
def test_zero_gradient_gives_no_nan(getkey):
    params = _params(getkey())
    zeros = jax.tree.map(jnp.zeros_like, params)
    for adaptive in (False, True):
        opt = eqx_norm.sam(optax.adam(1e-2), adaptive=adaptive)
        updates, _ = opt.update(
            zeros, opt.init(params), params, grad_fn=lambda p: zeros
        )
        for u in jax.tree.leaves(updates):
            np.testing.assert_array_equal(u, np.zeros_like(u))


def test_inject_hyperparams_and_chain(getkey):
    params = _params(getkey())
    c, d = _coefficients(getkey(), SHAPES)
    plain = _run(eqx_norm.sam(optax.sgd(0.05), rho=0.1), params, c, d, 3)
    injected_opt = optax.inject_hyperparams(eqx_norm.sam)(
        base_optimizer=optax.sgd(0.05), rho=0.1, adaptive=False
    )
    injected = _run(injected_opt, params, c, d, 3)
    chained = _run(
        optax.chain(optax.identity(), eqx_norm.sam(optax.sgd(0.05), rho=0.1)),
        params,
        c,
        d,
        3,
    )
    for k in SHAPES:
        np.testing.assert_allclose(injected[-1][k], plain[-1][k], rtol=1e-6)
        np.testing.assert_allclose(chained[-1][k], plain[-1][k], rtol=1e-6)
    # An injected rho of 0 is plain SGD.
    state = cast(Any, injected_opt.init(params))
    state.hyperparams["rho"] = jnp.asarray(0.0)
    updates: Any = injected_opt.update(
        _grad(params, c, d), state, params, grad_fn=lambda p: _grad(p, c, d)
    )[0]
    for k in SHAPES:
        np.testing.assert_allclose(
            updates[k], -0.05 * _grad(params, c, d)[k], rtol=1e-6
        )


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: eqx_norm.sam(optax.sgd(0.1), rho=-0.1), ValueError, "`rho` must be"),
        (
            lambda: eqx_norm.sam(optax.sgd(0.1), adaptive=True, eta=-1.0),
            ValueError,
            "`eta` must be",
        ),
        (
            lambda: eqx_norm.sam(lambda x: x),  # pyright: ignore[reportArgumentType]
            (ValueError, TypeError),
            "base_optimizer",
        ),
    ],
    ids=["negative-rho", "negative-eta", "not-an-optimizer"],
)
def test_bad_hyperparameters_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rho": float("nan")},
        {"rho": np.float32(-0.05)},
        {"rho": jnp.array(-0.05)},
        {"rho": float("inf")},
        {"adaptive": True, "eta": float("nan")},
        {"adaptive": True, "eta": np.float64(-0.01)},
    ],
    ids=[
        "nan-rho",
        "numpy-negative-rho",
        "jax-negative-rho",
        "inf-rho",
        "nan-eta",
        "numpy-negative-eta",
    ],
)
def test_sam_refuses_nan_and_numpy_negative_hyperparameters(kwargs):
    """Regression: NaN rho turned every parameter into NaN; a NumPy negative rho
    skipped the check and SAM climbed."""
    name = "eta" if "eta" in kwargs else "rho"
    with pytest.raises(ValueError, match=f"`{name}` must be finite and at least 0"):
        eqx_norm.sam(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"rho": "0.05"}, TypeError, "rho"),
        ({"rho": [0.05]}, TypeError, "rho"),
        ({"rho": np.array([0.05, 0.1])}, TypeError, "`rho` must be a real scalar"),
        ({"rho": np.complex64(0.05)}, ValueError, "`rho` must be finite"),
        ({"eta": "0.01"}, TypeError, "eta"),
    ],
    ids=["string", "list", "vector", "complex", "string-eta"],
)
def test_sam_refuses_hyperparameters_that_are_not_real_scalars(kwargs, error, message):
    with pytest.raises(error, match=message):
        eqx_norm.sam(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize("name", ["rho", "eta"])
def test_sam_refused_a_bfloat16_hyperparameter_and_took_one_infinite_in_float32(
    name, getkey
):
    """A `jnp.bfloat16(0.05)` radius was refused as "not a real scalar" (NumPy does
    not count bfloat16 as a number), and `rho=1e39`, finite as a Python float, was
    accepted and became infinite in the float32 rule: every parameter NaN. Now the
    first is the same SAM as its float32 value against the float64 formulas, and
    the second is refused naming float32."""
    params = _params(getkey())
    c, d = _coefficients(getkey(), SHAPES)
    value = jnp.bfloat16(0.05 if name == "rho" else 0.02)
    exact = float(value)  # 0.050048828125, 0.0200195...: what bfloat16 holds
    kwargs: dict[str, Any] = {"rho": 0.1, "eta": 0.02, "adaptive": name == "eta"}
    kwargs[name] = value
    ours = _run(eqx_norm.sam(optax.sgd(0.05), **kwargs), params, c, d, 2)
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    c64 = {k: np.asarray(v, np.float64) for k, v in c.items()}
    d64 = {k: np.asarray(v, np.float64) for k, v in d.items()}
    kwargs64 = {**kwargs, name: exact}
    for t in range(2):
        w = _numpy_sam_step(
            w, c64, d64, kwargs64["rho"], 0.05, kwargs64["adaptive"], kwargs64["eta"]
        )
        for k in SHAPES:
            np.testing.assert_allclose(ours[t][k], w[k], rtol=1e-5, atol=1e-6)
    for huge in (1e39, np.float64(1e39)):
        refused: dict[str, Any] = {name: huge}
        with pytest.raises(ValueError, match=rf"`{name}` must be finite in float32"):
            eqx_norm.sam(optax.sgd(0.1), **refused)
    largest: dict[str, Any] = {name: 3e38}  # still taken
    eqx_norm.sam(optax.sgd(0.1), **largest)


def test_sam_accepts_numpy_jax_scalars_and_schedules():
    for rho in (np.float32(0.05), jnp.array(0.05), optax.linear_schedule(0, 0.1, 5)):
        eqx_norm.sam(optax.sgd(0.1), rho=rho)


@pytest.mark.parametrize("adaptive", ["yes", None], ids=["a-string", "none"])
def test_sam_names_an_adaptive_that_is_not_a_bool(adaptive, getkey):
    """ASAM-ON (`adaptive=` with `mask=eqx_norm.normalisation_mask`), as a user
    without the suite's type checks makes it."""
    params = _params(getkey())
    before = leaves(params)
    with (
        as_a_user_calls_it(),
        pytest.raises(TypeError, match=r"`adaptive` must be True or False"),
    ):
        opt = eqx_norm.sam(optax.sgd(0.1), adaptive=adaptive)
        opt.update(params, opt.init(params), params, grad_fn=lambda p: p)
    assert_same(params, before)


def test_update_without_grad_fn_points_to_sam_step():
    opt = eqx_norm.sam(optax.sgd(0.1))
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"needs `grad_fn=`.*sam_step"):
        opt.update(params, opt.init(params), params)


def test_update_without_params_is_refused():
    opt = eqx_norm.sam(optax.sgd(0.1))
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs `params`"):
        opt.update(params, opt.init(params), grad_fn=lambda p: p)


# ---------------------------------------------------------------- sam_step


loss_fn = mse_loss


@pytest.mark.parametrize(
    "approach",
    [
        a
        if a in ("batch", "ema", "running")
        else pytest.param(a, marks=pytest.mark.slow)
        for a in APPROACHES
    ],
)
def test_sam_step_keeps_first_pass_state(approach, getkey):
    rho, lr = 0.05, 0.1
    model, state = eqx.nn.make_with_state(Net)(getkey(), approach)
    base = optax.sgd(lr)
    opt = eqx_norm.sam(base, rho=rho)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = opt.init(params)
    x, y = regression_data(getkey())
    step = eqx.filter_jit(eqx_norm.sam_step(loss_fn, opt))
    new_model, new_state, _, loss = step(model, state, opt_state, x, y)

    # The state equals that of one plain step on the same batch, exactly, and that
    # of an (eager) forward pass up to rounding.
    plain_step = eqx.filter_jit(eqx_norm.sam_step(loss_fn, base))
    _, plain_state, _, _ = plain_step(model, clone(state), base.init(params), x, y)
    assert_same(new_state, plain_state)
    _, forward_state = loss_fn(model, clone(state), x, y)
    assert_close(new_state, forward_state, rtol=1e-6)
    assert int(
        new_state.get(cast(eqx_norm.BatchNorm, model.layers[1]).state_index).counter
    ) == (0 if approach == "frozen" else (16 if approach == "running" else 1))

    # The parameters equal a hand-written two-pass SAM step.
    def loss_at(p):
        m = eqx.combine(p, eqx.filter(model, eqx.is_inexact_array, inverse=True))
        return loss_fn(m, clone(state), x, y)[0]

    grad = jax.jit(jax.grad(loss_at))
    g = grad(params)
    norm = optax.tree.norm(g)
    perturbed = jax.tree.map(lambda w, g: w + rho * g / norm, params, g)
    g2 = grad(perturbed)
    expected = jax.tree.map(lambda w, g: w - lr * g, params, g2)
    assert_close(
        eqx.filter(new_model, eqx.is_inexact_array), expected, rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(loss, jax.jit(loss_at)(params), rtol=1e-6)


@pytest.mark.standard_promotion
def test_sam_step_with_plain_optimizer_is_one_pass(getkey):
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = optax.adam(1e-2)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = regression_data(getkey())
    counted, passes = counting(loss_fn)
    step = eqx_norm.sam_step(counted, opt)
    eqx.filter_make_jaxpr(lambda m, s, o: step(m, s, o, x, y))(model, state, opt_state)
    assert len(passes) == 1
    sam_opt = eqx_norm.sam(opt)
    sam_state = sam_opt.init(eqx.filter(model, eqx.is_inexact_array))
    eqx.filter_make_jaxpr(
        lambda m, s, o: eqx_norm.sam_step(counted, sam_opt)(m, s, o, x, y)
    )(model, state, sam_state)
    assert len(passes) == 3  # two more: the first pass and the perturbed one

    new_model, _, _, _ = eqx.filter_jit(step)(model, state, opt_state, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)

    def loss_at(p):
        m = eqx.combine(p, eqx.filter(model, eqx.is_inexact_array, inverse=True))
        return loss_fn(m, clone(state), x, y)[0]

    updates, _ = opt.update(jax.jit(jax.grad(loss_at))(params), opt_state, params)
    expected = optax.apply_updates(params, updates)
    assert_close(
        eqx.filter(new_model, eqx.is_inexact_array), expected, rtol=1e-6, atol=1e-7
    )


def test_sam_step_returns_aux(getkey):
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = eqx_norm.sam(optax.sgd(0.1))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_with_aux(model, state, x, y):
        pred, state = apply(model, x, state)
        return jnp.mean((pred - y) ** 2), (state, {"pred_mean": jnp.mean(pred)})

    x, y = regression_data(getkey())
    out = eqx.filter_jit(eqx_norm.sam_step(loss_with_aux, opt, has_aux=True))(
        model, state, opt_state, x, y
    )
    assert len(out) == 5
    pred, _ = apply(model, x, clone(state))
    np.testing.assert_allclose(out[4]["pred_mean"], jnp.mean(pred), rtol=1e-6)


def _swapped(model, state, x, y):
    pred, state = apply(model, x, state)
    return jnp.mean((pred - y) ** 2), (pred, state)


def _bare(model, state, x, y):
    pred, _ = apply(model, x, state)
    return jnp.mean((pred - y) ** 2)


def _with_aux(model, state, x, y):
    loss, state = mse_loss(model, state, x, y)
    return loss, (state, {"loss": loss})


def _vector_loss(model, state, x, y):
    pred, state = apply(model, x, state)
    return (pred - y) ** 2, state


def _integer_loss(model, state, x, y):
    _, state = apply(model, x, state)
    return jnp.int32(3), state


@pytest.mark.parametrize(
    "loss_fn, has_aux, message",
    [
        (_swapped, True, r"\(loss, \(state, aux\)\).*The state comes first"),
        (_bare, False, r"\(loss, state\).*returned float32\[\]"),
        (_with_aux, False, "pass `has_aux=True`"),
        (mse_loss, True, "leave `has_aux=False`"),
        (_vector_loss, False, "must be a scalar"),
        (_integer_loss, False, "must be a scalar of a floating dtype"),
    ],
    ids=["swapped", "bare-scalar", "aux-undeclared", "aux-missing", "vector", "int"],
)
def test_sam_step_names_loss_fn_for_a_wrong_structure(loss_fn, has_aux, message):
    """Regression: `(loss, (aux, state))` made the step return the logits as the
    new state; a bare scalar loss gave 'iteration over a 0-d array'."""
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    opt = eqx_norm.sam(optax.sgd(0.1))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = regression_data(jax.random.key(1), n=8)
    step = eqx_norm.sam_step(loss_fn, opt, has_aux=has_aux)
    with pytest.raises(TypeError, match=f"`loss_fn` must return.*{message}"):
        eqx.filter_jit(step)(model, state, opt_state, x, y)


def test_per_device_perturbation_without_axis_name_is_refused():
    with pytest.raises(ValueError, match="needs the data axis"):
        eqx_norm.sam_step(mse_loss, optax.sgd(0.1), per_device_perturbation=True)


@pytest.mark.slow  # an ensemble and its members, each compiled
@pytest.mark.standard_promotion
def test_vmapped_ensemble_equals_separate_runs(getkey):
    keys = jax.random.split(getkey(), 4)
    opt = eqx_norm.sam(optax.adam(1e-2), rho=0.05)
    step = eqx_norm.sam_step(loss_fn, opt)
    batches = [regression_data(getkey()) for _ in range(3)]

    def init(key):
        model, state = eqx.nn.make_with_state(Net)(key)
        return model, state, opt.init(eqx.filter(model, eqx.is_inexact_array))

    models, states, opt_states = eqx.filter_vmap(init)(keys)
    vstep = eqx.filter_jit(
        eqx.filter_vmap(step, in_axes=(eqx.if_array(0),) * 3 + (None, None))
    )
    losses = loss = None
    for x, y in batches:
        models, states, opt_states, losses = vstep(models, states, opt_states, x, y)
    jstep = eqx.filter_jit(step)
    for i, key in enumerate(keys):
        model, state, opt_state = init(key)
        for x, y in batches:
            model, state, opt_state, loss = jstep(model, state, opt_state, x, y)
        assert losses is not None and loss is not None
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
        ours = jax.tree.leaves(eqx.filter(models, eqx.is_inexact_array))
        theirs = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(state)):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize(
    "make_opt, other",
    [
        (
            lambda: eqx_norm.sam(optax.sgd(0.1)),
            lambda: eqx_norm.looksam(optax.sgd(0.1)),
        ),
        (lambda: eqx_norm.sam(optax.sgd(0.1)), lambda: eqx_norm.sam(optax.adam(0.1))),
    ],
    ids=["looksam-state-to-sam", "sam-adam-state-to-sam-sgd"],
)
def test_sam_step_refuses_another_optimizers_state(make_opt, other, getkey):
    """An optimizer state of another optimizer ran silently and came back in
    another structure: now a `ValueError` naming `opt_state` and both structures,
    before any pass, with the model state untouched."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    opt, wrong = make_opt(), other()
    x, y = regression_data(getkey())
    before = jax.tree.leaves(clone(state))
    step = eqx_norm.sam_step(loss_fn, opt)
    expected = type(opt.init(params)).__name__
    got = type(wrong.init(params)).__name__
    with pytest.raises(ValueError, match=rf"`opt_state`.*{expected}.*{got}"):
        step(model, state, wrong.init(params), x, y)
    for a, b in zip(before, jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_per_micro_batch_under_inject_hyperparams_follows_the_injected_rho(getkey):
    """`optax.inject_hyperparams(eqx_norm.sam)` with an injected `rho`, perturbed
    per micro-batch: the same step as `rho` given directly."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    x, y = regression_data(getkey())
    kwargs = {"micro_batches": 2, "perturbation": "per-micro-batch"}
    injected = optax.inject_hyperparams(eqx_norm.sam, static_args="base_optimizer")(
        optax.sgd(0.1), rho=0.2
    )
    direct = eqx_norm.sam(optax.sgd(0.1), rho=0.2)
    assert_close(
        one_step(injected, model, state, x, y, **kwargs),
        one_step(direct, model, state, x, y, **kwargs),
        rtol=1e-6,
        atol=1e-7,
    )


def test_a_user_written_variant_on_the_contract(getkey):
    """The SAM variant of `eqx_norm.perturbed_gradient`'s docstring gets the
    gradient at `w + rho sign(g)`, through `sam_step`, against the same formula
    written out."""
    rho, lr = 0.03, 0.1
    signed_sam = docs_variant()

    model, state = eqx.nn.make_with_state(Net)(getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x, y = regression_data(getkey())
    opt = signed_sam(optax.sgd(lr), rho)
    new_model, new_state, _, _ = eqx.filter_jit(eqx_norm.sam_step(loss_fn, opt))(
        model, clone(state), opt.init(params), x, y
    )

    def loss_at(p):
        return loss_fn(eqx.combine(p, static), clone(state), x, y)[0]

    g = jax.grad(loss_at)(params)
    g2 = jax.grad(loss_at)(jax.tree.map(lambda w, g: w + rho * jnp.sign(g), params, g))
    expected = jax.tree.map(lambda w, g: w - lr * g, params, g2)
    assert_close(
        eqx.filter(new_model, eqx.is_inexact_array), expected, rtol=1e-5, atol=1e-6
    )
    _, plain_state, _, _ = eqx.filter_jit(eqx_norm.sam_step(loss_fn, optax.sgd(lr)))(
        model, clone(state), optax.sgd(lr).init(params), x, y
    )
    assert_same(new_state, plain_state)


class _FixedPointState(NamedTuple):
    next: eqx_norm.NextPerturbation
    base_state: optax.OptState


def test_one_pass_at_a_declared_point(getkey):
    """An optimizer that declares its next pass's point in its state (as
    Momentum-SAM does) gets exactly one forward and backward pass, taken there: the
    loss, gradient and BatchNorm state are those at `params + e`, while the
    parameters returned are `params` updated by that gradient."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    e = jax.tree.map(lambda p: 0.05 * jnp.ones_like(p), params)
    base = optax.sgd(0.1)

    def init_fn(params):
        return _FixedPointState(eqx_norm.NextPerturbation(e), base.init(params))

    def update_fn(updates, state, params=None, **extra):
        updates, base_state = base.update(updates, state.base_state, params)
        return updates, _FixedPointState(state.next, base_state)

    opt = optax.chain(
        optax.identity(), optax.GradientTransformation(init_fn, update_fn)
    )
    x, y = regression_data(getkey())
    counted, passes = counting(loss_fn)
    step = eqx_norm.sam_step(counted, opt)
    new_model, new_state, _, loss = eqx.filter_jit(step)(
        model, clone(state), opt.init(params), x, y
    )
    assert len(passes) == 1
    at = eqx.combine(eqx_norm.pass_point(opt.init(params), params), static)
    expected_loss, expected_state = loss_fn(at, clone(state), x, y)
    g = jax.grad(lambda p: loss_fn(eqx.combine(p, static), clone(state), x, y)[0])(
        eqx.filter(at, eqx.is_inexact_array)
    )
    expected = jax.tree.map(lambda w, g: w - 0.1 * g, params, g)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert_close(new_state, expected_state, rtol=1e-6, atol=1e-7)
    assert_close(
        eqx.filter(new_model, eqx.is_inexact_array), expected, rtol=1e-5, atol=1e-6
    )


def _variant(rule):
    """A SAM variant on the contract with the given perturbation rule."""
    base = optax.sgd(0.1)

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra):
        g = eqx_norm.perturbed_gradient(grad_fn, rule, updates, params)
        return base.update(g, state, params)

    return optax.GradientTransformationExtraArgs(base.init, update_fn)


@pytest.mark.parametrize(
    "mode",
    [{}, {"micro_batches": 2}, {"micro_batches": 2, "perturbation": "per-micro-batch"}],
    ids=["whole-batch", "micro-batches", "per-micro-batch"],
)
def test_a_perturbation_of_another_shape_reshaped_the_model(mode, getkey):
    """A rule returning `g[None]` (shape `(1, *w.shape)`) was added to the
    parameters by broadcasting: the gradient there had the extra axis, and the step
    returned a model whose every parameter had it too, with no error. A declared
    `NextPerturbation` of the wrong shape did the same. Both are now refused at
    trace time naming what was wrong; a scalar per leaf, which broadcasts to the
    parameter's own shape, is still `w + e`."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x, y = regression_data(getkey())
    before = leaves(state)

    extra_axis = _variant(lambda g, p: jax.tree.map(lambda a: 0.01 * a[None], g))
    step = eqx_norm.sam_step(loss_fn, extra_axis, **mode)
    with pytest.raises(ValueError, match=r"rule\(grads, params\)` has a leaf of sh"):
        step(model, state, extra_axis.init(params), x, y)

    wrong = jax.tree.map(lambda p: jnp.zeros((2,) + p.shape), params)

    def init_fn(params):
        return (eqx_norm.NextPerturbation(wrong),)

    def update_fn(updates, state, params=None):
        return updates, state

    declared = optax.GradientTransformation(init_fn, update_fn)
    step = eqx_norm.sam_step(loss_fn, declared, **mode)
    with pytest.raises(ValueError, match=r"`eqx_norm.NextPerturbation` in the opt"):
        step(model, state, declared.init(params), x, y)
    with pytest.raises(ValueError, match=r"does not have the structure"):
        eqx_norm.pass_point((eqx_norm.NextPerturbation({"w": jnp.ones(3)}),), params)
    assert_same(state, before)

    if mode:  # the scalar case needs no repeat over the step's options
        return
    scalar = _variant(lambda g, p: jax.tree.map(lambda _: jnp.float32(0.02), g))
    new_model, _, _, _ = eqx.filter_jit(eqx_norm.sam_step(loss_fn, scalar))(
        model, clone(state), scalar.init(params), x, y
    )

    def loss_at(p):
        return loss_fn(eqx.combine(p, static), clone(state), x, y)[0]

    g2 = jax.grad(loss_at)(jax.tree.map(lambda w: w + 0.02, params))
    expected = jax.tree.map(lambda w, g: w - 0.1 * g, params, g2)
    assert_close(
        eqx.filter(new_model, eqx.is_inexact_array), expected, rtol=1e-5, atol=1e-6
    )


class _Custom(eqx.Module):
    """A model without `eqx.nn.Lambda` (which no optimizer can initialise): every
    leaf is an array or a bool, so `optimizer.init(model)` unfiltered succeeds."""

    fc1: eqx.nn.Linear
    bn: eqx_norm.BatchNorm
    fc2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.fc1 = eqx.nn.Linear(4, 6, use_bias=False, key=k1)
        self.bn = eqx_norm.BatchNorm(6, "batch", momentum=0.9)
        self.fc2 = eqx.nn.Linear(6, 2, key=k2)

    def __call__(self, x, state):
        h, state = self.bn(self.fc1(x), state)
        return self.fc2(jax.nn.relu(h)), state


def test_jax_jit_of_sam_step_names_filter_jit(getkey):
    """Regression: `jax.jit(sam_step(...))` failed with a bare
    `TracerBoolConversionError` on the BatchNorm's `inference` flag."""
    model, state = eqx.nn.make_with_state(_Custom)(getkey())
    opt = eqx_norm.sam(optax.adam(1e-3))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = regression_data(getkey())
    before = leaves((model, state, opt_state))
    with pytest.raises(
        TypeError,
        match=r"`inference` flag \(at `model\.bn\.inference`\) is a traced array.*"
        r"`jax\.jit`.*`step = eqx\.filter_jit\(eqx_norm\.sam_step\(loss_fn, "
        r"optimizer\)\)`",
    ):
        jax.jit(eqx_norm.sam_step(mse_loss, opt))(model, state, opt_state, x, y)
    assert_same((model, state, opt_state), before)
    # A loss of the user's own under `jax.jit`: the layer names the fix itself.
    with pytest.raises(TypeError, match=r"traced array.*`eqx\.filter_jit`"):
        jax.jit(mse_loss)(model, state, x, y)


def test_opt_state_of_the_unfiltered_model_names_the_first_difference(getkey):
    """Regression: `optimizer.init(model)` (unfiltered) was refused with two
    pictures of the structures that read the same; now the message names the first
    leaf that differs, with its path."""
    model, state = eqx.nn.make_with_state(_Custom)(getkey())
    opt = eqx_norm.sam(optax.adam(1e-3))
    x, y = regression_data(getkey())
    with pytest.raises(
        ValueError,
        match=r"at `opt_state\.base_state\[0\]\.mu\.bn\.inference` the optimizer "
        r"makes nothing \(`None`: not a parameter\), but the step got an array "
        r"bool\[\].*the parameters only, not the whole model",
    ):
        eqx_norm.sam_step(mse_loss, opt)(model, state, opt.init(cast(Any, model)), x, y)
    # A state of other shapes is named at the first leaf of another shape.
    other = eqx.tree_at(lambda m: m.fc2, model, eqx.nn.Linear(6, 3, key=getkey()))
    wrong = opt.init(eqx.filter(other, eqx.is_inexact_array))
    with pytest.raises(
        ValueError,
        match=r"at `opt_state\.base_state\[0\]\.mu\.fc2\.weight` the optimizer makes "
        r"an array float32\[2, 6\], but the step got an array float32\[3, 6\]",
    ):
        eqx_norm.sam_step(mse_loss, opt)(model, state, wrong, x, y)


@pytest.mark.standard_promotion  # optax.MultiSteps
@pytest.mark.parametrize(
    "make",
    [eqx_norm.sam, eqx_norm.looksam, lambda base: docs_variant()(base, 0.01)],
    ids=["sam", "looksam", "docs-variant"],
)
def test_sam_inside_multi_steps_that_accumulates_is_refused(make, getkey):
    """Regression: SAM inside `optax.MultiSteps(every_k_schedule=k)` with k > 1
    perturbed with the accumulated gradient but took the perturbed gradient on the
    last mini-batch only: silently another optimizer. The step now stops at the
    first accumulating mini-step (k may be a schedule, so it is a run-time value),
    before any update is applied, naming `micro_batches`; a variant written on the
    contract (the docs') is refused as `eqx_norm.sam` is."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt = optax.MultiSteps(make(optax.sgd(0.1)), every_k_schedule=2)
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))
    x, y = regression_data(getkey())
    model, state, opt_state, _ = step(
        model, state, opt.init(eqx.filter(model, eqx.is_inexact_array)), x, y
    )
    before = leaves((model, state, opt_state))
    with pytest.raises(
        eqx.EquinoxRuntimeError,
        match=r"inside `optax\.MultiSteps` with `every_k_schedule` above 1.*"
        r"micro_batches=k",
    ):
        step(model, state, opt_state, x, y)
    assert_same((model, state, opt_state), before)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda s: eqx_norm.sam(optax.sgd(0.1), rho=s), "rho"),
        (lambda s: eqx_norm.looksam(optax.sgd(0.1), rho=s, every=1), "rho"),
        (lambda s: eqx_norm.looksam(optax.sgd(0.1), alpha=s, every=2), "alpha"),
        (lambda s: eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=s), "rho"),
    ],
    ids=["sam", "looksam-rho", "looksam-alpha", "msam"],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.1], ids=["nan", "inf", "negative"])
def test_a_schedule_that_goes_bad_stops_the_update(make, name, bad, getkey):
    """Regression: a `rho` or `alpha` schedule returning NaN, infinity or a negative
    value turned every parameter NaN or silently ascended; it is checked when it
    runs (here from the second step on), naming the hyperparameter."""
    opt = make(lambda count: jnp.where(count >= 1, bad, 0.05).astype(jnp.float32))
    model, state = eqx.nn.make_with_state(Net)(getkey())
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))
    x, y = regression_data(getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = opt.init(params)
    with pytest.raises(
        eqx.EquinoxRuntimeError,
        match=rf"`{name}` is NaN, infinite or negative at this update.*schedule",
    ):
        for _ in range(3):  # msam evaluates it one count ahead, looksam's alpha
            model, state, opt_state, _ = step(model, state, opt_state, x, y)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(params))


def test_an_injected_nan_rho_stops_the_update(getkey):
    opt = optax.inject_hyperparams(eqx_norm.sam, static_args="base_optimizer")(
        optax.sgd(0.1), rho=0.05
    )
    model, state = eqx.nn.make_with_state(Net)(getkey())
    opt_state: Any = opt.init(eqx.filter(model, eqx.is_inexact_array))
    opt_state.hyperparams["rho"] = jnp.asarray(jnp.nan)
    x, y = regression_data(getkey())
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"`eqx_norm\.sam`: `rho` is NaN"):
        eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))(model, state, opt_state, x, y)


# ------------------------------------------------- the contract: bad input


def _sign_rule(grads, params):
    return jax.tree.map(lambda g: 0.01 * jnp.sign(g), grads)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda p, g: eqx_norm.perturbed_gradient(None, _sign_rule, g, p),
            r"this optimizer's `update` needs `grad_fn=`.*`eqx_norm\.sam_step",
        ),
        (
            lambda p, g: eqx_norm.perturbed_gradient(lambda q: q, _sign_rule, g, None),
            r"this optimizer's `update` needs `params`.*`opt\.update\(grads, ",
        ),
        (
            lambda p, g: (opt := docs_variant()(optax.sgd(0.1), 0.01)).update(
                g, opt.init(p), p
            ),
            r"this optimizer's `update` needs `grad_fn=`",
        ),
        (
            lambda p, g: (opt := docs_variant()(optax.sgd(0.1), 0.01)).update(
                g, opt.init(p), grad_fn=lambda q: q
            ),
            r"this optimizer's `update` needs `params`",
        ),
    ],
    ids=[
        "no-grad-fn",
        "no-params",
        "docs-variant-without-grad-fn",
        "docs-variant-without-params",
    ],
)
def test_perturbed_gradient_names_what_an_update_was_not_given(call, message, getkey):
    """Called directly, or through the docs' variant's `update`, without
    `grad_fn` or `params`: the error says which and how to pass it."""
    params = _params(getkey())
    grads = jax.tree.map(lambda w: 0.5 * w, params)
    before = leaves((params, grads))
    with pytest.raises(ValueError, match=message):
        call(params, grads)
    assert_same((params, grads), before)


@pytest.mark.parametrize(
    "rule, grads_given",
    [
        (lambda g, p: None, True),
        (lambda g, p: 0.1, True),
        (lambda g, p: jax.tree.leaves(g), True),
        (_sign_rule, False),
    ],
    ids=["returns-none", "returns-a-scalar", "returns-a-list-of-leaves", "grads-none"],
)
def test_a_rule_whose_perturbation_is_not_a_tree_of_the_parameters(
    rule, grads_given, getkey
):
    """Under `jax.jit` (traced parameters and gradients), a rule returning `None`,
    one number or the leaves as a list, or a rule given `None` for the gradient,
    is refused at trace time naming the rule and the structures."""
    params = _params(getkey())
    grads = jax.tree.map(lambda w: 0.5 * w, params)
    before = leaves((params, grads))

    @jax.jit
    def perturbed(params, grads):
        given: Any = grads if grads_given else None
        return eqx_norm.perturbed_gradient(lambda p: p, rule, given, params)

    with pytest.raises(
        ValueError,
        match=r"the perturbation rule's `e = rule\(grads, params\)` does not have "
        r"the structure of the parameters: the parameters are PyTreeDef\(\{'a'",
    ):
        perturbed(params, grads)
    assert_same((params, grads), before)


@pytest.mark.parametrize(
    "perturbation",
    [None, 0.1, "leaves"],
    ids=["none", "a-scalar", "a-list-of-leaves"],
)
def test_pass_point_refuses_a_declared_perturbation_that_is_not_a_tree(
    perturbation, getkey
):
    params = _params(getkey())
    if perturbation == "leaves":
        perturbation = [jnp.zeros_like(w) for w in jax.tree.leaves(params)]
    opt_state = (optax.EmptyState(), eqx_norm.NextPerturbation(perturbation))
    before = leaves((params, opt_state))
    with pytest.raises(
        ValueError,
        match=r"the `eqx_norm\.NextPerturbation` in the optimizer state does not have "
        r"the structure of the parameters",
    ):
        eqx_norm.pass_point(opt_state, params)
    assert_same((params, opt_state), before)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (lambda g: (lambda p: p, None), r"`rule`.*function"),
        (lambda g: (lambda p: p, 0.05), r"`rule`.*function"),
        (lambda g: (g, _sign_rule), r"`grad_fn`.*function"),
    ],
    ids=["rule-none", "a-radius-as-rule", "the-gradient-as-grad-fn"],
)
def test_perturbed_gradient_names_a_rule_or_grad_fn_that_is_no_function(
    arguments, message, getkey
):
    params = _params(getkey())
    grads = jax.tree.map(lambda w: 0.5 * w, params)
    grad_fn, rule = arguments(grads)
    before = leaves((params, grads))
    with as_a_user_calls_it(), pytest.raises(TypeError, match=message):
        eqx_norm.perturbed_gradient(grad_fn, rule, grads, params)
    assert_same((params, grads), before)


@pytest.mark.parametrize("source", ["rule", "declared"])
def test_a_perturbation_of_strings_is_named(source, getkey):
    params = _params(getkey())
    strings = jax.tree.map(lambda _: "x", params)
    before = leaves(params)
    with pytest.raises(TypeError, match=r"(rule|NextPerturbation).*(number|array)"):
        if source == "rule":
            eqx_norm.perturbed_gradient(
                lambda p: p,
                lambda g, p: strings,
                jax.tree.map(jnp.ones_like, params),
                params,
            )
        else:
            eqx_norm.pass_point((eqx_norm.NextPerturbation(strings),), params)
    assert_same(params, before)


@pytest.mark.parametrize(
    "params", [None, {"a": jnp.ones((4, 3))}], ids=["none", "another-models"]
)
def test_pass_point_names_params_that_do_not_fit_the_optimizer_state(params, getkey):
    opt = eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    opt_state = opt.init(_params(getkey()))
    before = leaves((params, opt_state))
    with pytest.raises(ValueError, match=r"`pass_point`.*`params`"):
        eqx_norm.pass_point(opt_state, params)
    assert_same((params, opt_state), before)


@pytest.mark.parametrize(
    "point",
    [lambda model, params: {"w": jnp.ones(3)}, lambda model, params: model],
    ids=["another-tree", "the-whole-model"],
)
def test_the_step_gradient_names_a_point_that_is_not_the_parameters(point, getkey):
    model, state = eqx.nn.make_with_state(Net)(getkey())
    base = optax.sgd(0.1)

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra):
        assert grad_fn is not None
        return base.update(grad_fn(point(model, params)), state, params)

    opt = optax.GradientTransformationExtraArgs(base.init, update_fn)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    before = leaves((model, state, opt_state))
    with pytest.raises(ValueError, match=r"`grad_fn`.*structure of the parameters"):
        eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))(
            model, state, opt_state, *regression_data(getkey())
        )
    assert_same((model, state, opt_state), before)


def test_sam_inside_optax_masked_that_leaves_parameters_out(getkey):
    """It updates what the mask leaves in as SAM with that `mask` does (the
    perturbation and its norm over those parameters only)."""
    model, state = eqx.nn.make_with_state(Net)(getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    mask = jax.tree.map(lambda _: False, params)
    mask = eqx.tree_at(lambda p: p.layers[3].weight, mask, True)
    x, y = regression_data(getkey())
    inside, _, _ = one_step(
        optax.masked(eqx_norm.sam(optax.sgd(0.1), rho=0.3), mask), model, state, x, y
    )
    alone, _, _ = one_step(
        eqx_norm.sam(optax.sgd(0.1), rho=0.3, mask=mask), model, state, x, y
    )
    assert_close(inside.layers[3].weight, alone.layers[3].weight, rtol=1e-6, atol=1e-7)
