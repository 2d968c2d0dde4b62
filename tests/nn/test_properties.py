"""Property tests of the layer's guarantees across approaches, dtypes, shapes and
momentum."""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import eqx_norm

from ..helpers import apply, clone

APPROACHES = list(eqx_norm.APPROACHES)
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SETTINGS = settings(
    # Each example compiles its own shapes; PROPERTY_EXAMPLES=100 for a longer hunt.
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", 4)),
    deadline=None,
    # Reproducible examples in CI; fresh ones on developers' machines.
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def cases(draw, approaches=APPROACHES):
    batch = draw(st.integers(2, 6))
    channels = draw(st.integers(1, 4))
    spatial = draw(st.sampled_from([(), (3,), (2, 3)]))
    return {
        "approach": draw(st.sampled_from(approaches)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "shape": (batch, channels) + spatial,
        "momentum": draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])),
        "offset": draw(st.floats(-10, 10)),
        "scale": draw(st.floats(0.1, 10)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _setup(case, steps=3):
    rng = np.random.default_rng(case["seed"])
    channels = case["shape"][1]
    bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(
        channels, "batch", approach=case["approach"], momentum=case["momentum"]
    )
    bn = eqx.tree_at(
        lambda b: (b.weight, b.bias),
        bn,
        (
            jnp.asarray(rng.uniform(0.5, 2, channels), jnp.float32),
            jnp.asarray(rng.uniform(-1, 1, channels), jnp.float32),
        ),
    )
    xs = [
        jnp.asarray(
            case["offset"] + case["scale"] * rng.normal(size=case["shape"]),
            case["dtype"],
        )
        for _ in range(steps)
    ]
    return bn, state, xs


def _float32_precision(bn, state, x):
    """The layer's documented float32 precision, relative to the output's std, for
    the worst channel: the batch variance keeps about 7 - 2 log10(k) digits, k the
    distance of the batch mean from the shift (the layer's inference mean) in batch
    standard deviations; and the output, one multiply-add on `x`, carries the
    rounding of `|x|` in batch standard deviations."""
    axes = (0,) + tuple(range(2, x.ndim))
    xf = np.asarray(x, np.float64)
    shift = np.asarray(bn.statistics(state)[0], np.float64)
    std = np.sqrt(xf.var(axes) + bn.eps)
    k = np.max(np.abs(xf.mean(axes) - shift) / std)
    distance_from_zero = np.max(np.max(np.abs(xf), axes) / std)
    return 1.2e-7 * max(k**2, distance_from_zero)


@given(cases())
@SETTINGS
def test_finite_input_gives_finite_output_and_state(case):
    bn, state, xs = _setup(case)
    for x in xs:
        y, state = apply(bn, x, state)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert np.all(np.isfinite(np.asarray(y, np.float32)))
        assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state))
    y, _ = apply(bn, xs[0], state, inference=True)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


@given(cases())
@SETTINGS
def test_jit_equals_eager(case):
    bn, state, xs = _setup(case, steps=2)
    jitted = jax.jit(lambda x, s: apply(bn, x, s))
    eager_state, jit_state = state, clone(state)
    worst = carried = 1e-5
    for x in xs:
        # Jit and eager may round apart by the documented precision, and half
        # precision by its own rounding. Approaches that
        # normalise with their running statistics carry an earlier step's rounding
        # on in them, as documented, so their tolerance never drops below it.
        tol = max(1e-5, 8 * _float32_precision(bn, eager_state, x))
        if case["dtype"] != jnp.float32:
            tol = max(tol, float(jnp.finfo(case["dtype"]).eps) * 4)
        if case["approach"] not in ("batch", "frozen"):
            tol = carried = max(tol, carried)
        worst = max(worst, tol)
        y, eager_state = apply(bn, x, eager_state)
        y_jit, jit_state = jitted(x, jit_state)
        np.testing.assert_allclose(
            np.asarray(y_jit, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol
        )
    for a, b in zip(jax.tree.leaves(jit_state), jax.tree.leaves(eager_state)):
        np.testing.assert_allclose(a, b, rtol=worst, atol=1e-6)


@given(cases(approaches=["batch"]))
@SETTINGS
def test_batch_output_has_mean_bias_and_std_weight(case):
    bn, state, xs = _setup(case)
    assert bn.weight is not None and bn.bias is not None
    axes = (0,) + tuple(range(2, len(case["shape"])))
    for x in xs:
        # Far from the shift (the first step of data far from zero) the documented
        # precision is what bounds the output's std.
        precision = 8 * _float32_precision(bn, state, x)
        y, state = apply(bn, x, state)
        yf = np.asarray(y, np.float64)
        xf = np.asarray(x, np.float64)
        # What the weight times the normalised input has for std: eps shrinks it.
        var = xf.var(axes)
        std = np.asarray(bn.weight, np.float64) * np.sqrt(var / (var + bn.eps))
        tol = max(2e-3 if case["dtype"] == jnp.float32 else 4e-2, precision)
        scale = np.max(np.abs(np.asarray(bn.weight))) + np.max(
            np.abs(np.asarray(bn.bias))
        )
        np.testing.assert_allclose(yf.mean(axes), bn.bias, atol=tol * scale)
        np.testing.assert_allclose(yf.std(axes), std, atol=tol * scale)


@given(cases(), st.sampled_from([np.nan, np.inf, -np.inf]))
@SETTINGS
def test_non_finite_batch_never_changes_the_state(case, poison):
    bn, state, xs = _setup(case)
    _, state = apply(bn, xs[0], state)
    bad = xs[1].at[(0,) * len(case["shape"])].set(poison)
    _, after = apply(bn, bad, clone(state))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


@given(cases(), st.sampled_from(APPROACHES))
@SETTINGS
def test_switching_approach_keeps_the_state_structure(case, other):
    bn, state, xs = _setup(case)
    _, state = apply(bn, xs[0], state)
    switched = eqx_norm.set_approach(bn, other)
    state = eqx_norm.match_state(switched, state)  # tracking's candidates
    structure = jax.tree.structure(state)
    kinds = [(a.shape, a.dtype) for a in jax.tree.leaves(state)]
    for x in xs[1:]:
        _, state = apply(switched, x, state)
        assert jax.tree.structure(state) == structure
        assert [(a.shape, a.dtype) for a in jax.tree.leaves(state)] == kinds
