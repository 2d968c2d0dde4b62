"""LookSAM against a float64 NumPy implementation of its update, against
`eqx_norm.sam` at `every=1`, and the number of second passes it really makes."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_norm

F64 = np.float64
A = np.array([1.0, 3.0, 0.5, 2.0])
B = np.array([[0.3, -1.0], [2.0, 0.1]])


def _loss(p):
    """A smooth non-quadratic loss of two leaves, so that SAM's gradient differs
    from the plain one in direction."""
    return (
        0.5 * jnp.sum(A * p["a"] ** 2)
        + jnp.sum(jnp.sin(B * p["b"]))
        + jnp.sum(p["a"][:2] * p["b"][0]) ** 2
    )


def _grad64(p):
    a, b = p["a"], p["b"]
    s = np.sum(a[:2] * b[0])
    ga = A * a
    ga[:2] += 2 * s * b[0]
    gb = B * np.cos(B * b)
    gb[0] += 2 * s * a[:2]
    return {"a": ga, "b": gb}


class _SGDMomentum:
    def __init__(self, lr, momentum):
        self.lr, self.m, self.v = lr, momentum, None

    def __call__(self, g):
        self.v = g if self.v is None else {k: g[k] + self.m * self.v[k] for k in g}
        return {k: -self.lr * self.v[k] for k in g}


class _Adam:
    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.mu = self.nu = None

    def __call__(self, g):
        self.t += 1
        zeros = {k: np.zeros_like(v) for k, v in g.items()}
        mu, nu = self.mu or zeros, self.nu or zeros
        self.mu = {k: self.b1 * mu[k] + (1 - self.b1) * g[k] for k in g}
        self.nu = {k: self.b2 * nu[k] + (1 - self.b2) * g[k] ** 2 for k in g}
        out = {}
        for k in g:
            m_hat = self.mu[k] / (1 - self.b1**self.t)
            v_hat = self.nu[k] / (1 - self.b2**self.t)
            out[k] = -self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return out


def _dot(a, b):
    return sum(float(np.sum(a[k] * b[k])) for k in a)


def _reference(params, steps, base, rho, every, alpha, adaptive, eta, mask):
    """Float64: the parameters after each step of LookSAM as its docstring states."""
    p = {k: np.asarray(v, F64) for k, v in params.items()}
    g_v = {k: np.zeros_like(v) for k, v in p.items()}
    out = []
    for t in range(steps):
        g = _grad64(p)
        if t % every == 0:
            t_w = {
                k: (np.abs(p[k]) + eta) if adaptive else np.ones_like(p[k]) for k in p
            }
            gm = {k: g[k] * mask[k] for k in g}
            tg = {k: t_w[k] * gm[k] for k in g}
            norm = math.sqrt(_dot(tg, tg))
            e = {k: (rho / norm * t_w[k] * tg[k]) if norm > 0 else 0 * g[k] for k in g}
            g_s = _grad64({k: p[k] + e[k] for k in p})
            gg = _dot(g, g)
            coef = _dot(g, g_s) / gg if gg > 0 else 0.0
            g_v = {k: g_s[k] - coef * g[k] for k in g}
            direction = g_s
        else:
            v2 = _dot(g_v, g_v)
            factor = alpha * math.sqrt(_dot(g, g) / v2) if v2 > 0 else 0.0
            direction = {k: g[k] + factor * g_v[k] for k in g}
        update = base(direction)
        p = {k: p[k] + update[k] for k in p}
        out.append(p)
    return out


def _params():
    return {
        "a": jnp.array([0.5, -1.0, 2.0, 0.3]),
        "b": jnp.array([[1.0, -0.5], [0.2, 0.8]]),
    }


def _run(opt, steps, params=None):
    params = _params() if params is None else params
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(_loss)(params)
        updates, state = opt.update(grads, state, params, grad_fn=jax.grad(_loss))
        return optax.apply_updates(params, updates), state

    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out, state


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize("every", [1, 3, 5])
@pytest.mark.parametrize("base", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_looksam_against_float64_reference(every, base, adaptive):
    """20 steps with a mask that perturbs only `a`."""
    rho, alpha, eta = 0.05, 0.7, 0.01
    if base == "adam":
        optimizer, reference = optax.adam(0.01), _Adam(0.01)
    else:
        optimizer, reference = optax.sgd(0.05, momentum=0.9), _SGDMomentum(0.05, 0.9)
    opt = eqx_norm.looksam(
        optimizer,
        rho=rho,
        every=every,
        alpha=alpha,
        adaptive=adaptive,
        eta=eta,
        mask={"a": True, "b": False},
    )
    ours, _ = _run(opt, 20)
    mask = {"a": np.ones(4), "b": np.zeros((2, 2))}
    expected = _reference(
        _params(), 20, reference, rho, every, alpha, adaptive, eta, mask
    )
    for t, (a, b) in enumerate(zip(ours, expected)):
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=f"{t}")


@pytest.mark.parametrize("adaptive", [False, True])
def test_every_step_is_sam(adaptive):
    base = optax.sgd(0.05, momentum=0.9)
    ours, _ = _run(eqx_norm.looksam(base, every=1, adaptive=adaptive), 10)
    sam, _ = _run(eqx_norm.sam(base, adaptive=adaptive), 10)
    for a, b in zip(ours, sam):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("every, steps", [(1, 7), (3, 10), (5, 10), (4, 4)])
def test_second_passes_are_really_skipped_under_jit(every, steps):
    """A host counter in `grad_fn` counts the second passes that run:
    ceil(steps / every)."""
    calls = []

    def counted(p):
        jax.debug.callback(lambda: calls.append(1))
        return jax.grad(_loss)(p)

    opt = eqx_norm.looksam(optax.sgd(0.05), every=every)
    params = _params()
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(
            jax.grad(_loss)(params), state, params, grad_fn=counted
        )
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    jax.effects_barrier()
    assert len(calls) == math.ceil(steps / every)


def test_alpha_zero_is_sam_every_k_steps():
    """Between SAM steps, `alpha=0` gives the base optimizer the plain gradient."""
    opt = eqx_norm.looksam(optax.sgd(0.1), every=2, alpha=0.0)
    ours, _ = _run(opt, 2)
    first, _ = _run(eqx_norm.sam(optax.sgd(0.1)), 1)
    plain = jax.tree.map(lambda w, g: w - 0.1 * g, first[0], jax.grad(_loss)(first[0]))
    for k in plain:
        np.testing.assert_allclose(ours[1][k], plain[k], rtol=1e-6)


def test_inside_chain_and_inject_hyperparams():
    base = optax.sgd(0.05, momentum=0.9)
    expected, _ = _run(eqx_norm.looksam(base, rho=0.1, every=3, alpha=0.5), 8)
    chained, _ = _run(
        optax.chain(
            optax.identity(), eqx_norm.looksam(base, rho=0.1, every=3, alpha=0.5)
        ),
        8,
    )
    injected, state = _run(
        optax.inject_hyperparams(eqx_norm.looksam, static_args=("base_optimizer",))(
            base_optimizer=base, rho=0.1, every=3, alpha=0.5
        ),
        8,
    )
    for other in (chained, injected):
        for a, b in zip(other, expected):
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert float(state.hyperparams["rho"]) == pytest.approx(0.1)  # pyright: ignore


@pytest.mark.slow  # 7 s
@pytest.mark.standard_promotion  # optax.adam
def test_looksam_through_sam_step_keeps_first_pass_state(getkey):
    """Through `sam_step` with a BatchNorm model: the state after each step is that
    of the plain step, on SAM steps and reuse steps alike."""
    from ..helpers import Net, clone, mse_loss

    model, state = eqx.nn.make_with_state(Net)(getkey(), "batch")
    params = eqx.filter(model, eqx.is_inexact_array)
    opt = eqx_norm.looksam(optax.adam(1e-2), every=2)
    plain = optax.adam(1e-2)
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))
    plain_step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, plain))
    opt_state = opt.init(params)
    for _ in range(3):
        x = jax.random.normal(getkey(), (16, 4)) * 2 + 1
        y = jax.random.normal(getkey(), (16, 2))
        _, plain_state, _, _ = plain_step(model, clone(state), plain.init(params), x, y)
        model, state, opt_state, _ = step(model, state, opt_state, x, y)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"every": 0}, ValueError, "`every` must be a positive int"),
        ({"every": 2.5}, TypeError, "every"),
        ({"alpha": -0.1}, ValueError, "`alpha` must be finite and at least 0"),
        ({"alpha": float("nan")}, ValueError, "`alpha` must be finite"),
        ({"rho": -1.0}, ValueError, "`rho` must be finite and at least 0"),
    ],
    ids=["every-0", "every-float", "alpha-negative", "alpha-nan", "rho-negative"],
)
def test_bad_hyperparameters_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        eqx_norm.looksam(optax.sgd(0.1), **kwargs)


def test_update_without_grad_fn_points_to_sam_step():
    opt = eqx_norm.looksam(optax.sgd(0.1))
    params = _params()
    with pytest.raises(ValueError, match=r"needs `grad_fn=`.*sam_step"):
        opt.update(params, opt.init(params), params)


@pytest.mark.parametrize(
    "every, error, message",
    [
        (2**31, ValueError, r"`every` must be at most 2147483647"),
        (2**40, ValueError, r"`every` must be at most"),
        (np.int64(2**31), ValueError, r"`every` must be at most"),
        (-1, ValueError, r"`every` must be a positive int"),
        (True, TypeError, r"`every` must be an int"),
    ],
    ids=["2**31", "2**40", "np-2**31", "negative", "bool"],
)
def test_every_beyond_int32_is_refused_at_construction(every, error, message):
    """`looksam(every=2**31)` was accepted and the first `update` raised an
    `OverflowError` naming nothing: the step count is an int32."""
    with pytest.raises(error, match=message):
        eqx_norm.looksam(optax.sgd(0.1), every=every)


def test_every_takes_integers_of_any_type():
    """NumPy and JAX integers are the same `every` as a Python int."""
    params = _params()
    grads = jax.tree.map(lambda p: 0.1 * p + 0.2, params)
    grad_fn = lambda p: jax.tree.map(lambda q: 0.1 * q + 0.2, p)  # noqa: E731
    outs = []
    for every in (3, np.int64(3), np.uint16(3), jnp.asarray(3), 2**31 - 1):
        opt = eqx_norm.looksam(optax.sgd(0.1), every=every)
        outs.append(opt.update(grads, opt.init(params), params, grad_fn=grad_fn)[0])
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(a, b)


def test_alpha_schedule_is_evaluated_at_the_step_count():
    """`alpha` as a schedule was accepted by the check and failed on the first
    reusing step; it is now evaluated at the update count, as `rho` is: two steps
    with `alpha(t) = 0.1 (t + 1)` equal two steps with `alpha=0.2`, the value the
    reusing step (t = 1) reads."""
    params = _params()
    grad_fn = lambda p: jax.tree.map(lambda q: 0.1 * q + 0.2 * q**2 + 0.1, p)  # noqa: E731
    outs = []
    for alpha in (lambda t: 0.1 * (t + 1).astype(jnp.float32), 0.2):
        opt = eqx_norm.looksam(optax.sgd(0.1), every=2, alpha=alpha)
        p, state = params, opt.init(params)
        for _ in range(2):
            updates, state = opt.update(grad_fn(p), state, p, grad_fn=grad_fn)
            p = optax.apply_updates(p, updates)
        outs.append(p)
    for a, b in zip(*map(jax.tree.leaves, outs)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(jax.tree.leaves(outs[0])[0], jax.tree.leaves(params)[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 1 + 2j}, r"`alpha` must be finite and at least 0"),
        ({"alpha": np.array([0.1, 0.2])}, r"`alpha` must be a real scalar or a sch"),
    ],
    ids=["alpha-complex", "alpha-vector"],
)
def test_hyperparameters_say_what_is_accepted(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        eqx_norm.looksam(optax.sgd(0.1), **kwargs)


def test_alpha_in_bfloat16_was_refused_and_one_infinite_in_float32_taken():
    """`alpha=jnp.bfloat16(0.5)` was refused as "not a real scalar", and
    `alpha=1e39` was accepted and made every reusing step infinite. Now the first
    is LookSAM with alpha's float32 value (against the float64 reference) and the
    second, as `rho=1e39` and `msam(rho=1e39)`, is refused naming float32."""
    alpha = jnp.bfloat16(0.3)  # 0.30078125 exactly
    opt = eqx_norm.looksam(optax.sgd(0.1), rho=0.05, every=2, alpha=alpha)
    ours, _ = _run(opt, 4)
    ref = _reference(
        _params(),
        4,
        _SGDMomentum(0.1, 0.0),
        0.05,
        2,
        float(alpha),
        False,
        0.01,
        {"a": 1.0, "b": 1.0},
    )
    for t in range(4):
        for k in ("a", "b"):
            np.testing.assert_allclose(ours[t][k], ref[t][k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"`alpha` must be finite in float32"):
        eqx_norm.looksam(optax.sgd(0.1), alpha=1e39)
    with pytest.raises(ValueError, match=r"`rho` must be finite in float32"):
        eqx_norm.looksam(optax.sgd(0.1), rho=np.float64(1e39))
    with pytest.raises(ValueError, match=r"`rho` must be finite in float32"):
        eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=1e39)


def test_default_alpha_is_the_measured_ratio_not_the_papers():
    """The paper's `alpha=0.7` injected about five times SAM's own orthogonal
    correction on the experiment's CNN (where ||g_v|| / ||g|| is about 0.13) and
    trained worse than the base optimizer; the default is 0.1, near that ratio."""
    import inspect

    from eqx_norm import experiments

    default = inspect.signature(eqx_norm.looksam).parameters["alpha"].default
    assert default == 0.1
    assert experiments.SAMConfig().alpha == default
