import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_norm

from ..helpers import (
    apply,
    assert_same,
    batches,
    clone,
    leaves,
    make,
    stored,
    train_step,
    with_affine,
)
from ..reference import REFERENCES, FrozenRef

APPROACHES = list(eqx_norm.APPROACHES)
F64 = np.float64


def _close(actual, expected, rtol, what):
    actual = np.asarray(actual, F64)
    scale = np.max(np.abs(expected)) + 1e-12
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what
    )


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5), (4, 3, 2, 3)])
def test_matches_float64_reference(approach, shape, getkey):
    """50 steps, momentum 0.9, drifting batches: outputs, input gradients and
    statistics in training and inference, against the float64 formulas."""
    momentum = 0.9
    bn, state = make(3, approach=approach, momentum=momentum)
    bn = with_affine(bn, getkey())
    w, b = np.asarray(bn.weight, F64), np.asarray(bn.bias, F64)
    ref = REFERENCES[approach](3, momentum)
    if approach == "frozen":
        # Freeze statistics that a few `batch` steps produced.
        warm, state = make(3, momentum=momentum)
        warm_ref = REFERENCES["batch"](3, momentum)
        for x in batches(getkey(), 3, shape):
            _, _, state = train_step(warm, x, jnp.ones_like(x), state)
            warm_ref.step(np.asarray(x, F64), np.ones(x.shape), w, b)
        ref = FrozenRef(3, momentum, mean=warm_ref.infer()[0], var=warm_ref.infer()[1])
    for t, x in enumerate(batches(getkey(), 50, shape)):
        g = jax.random.normal(getkey(), shape)
        y, dx, state = train_step(bn, x, g, state)
        y_ref, dx_ref = ref.step(np.asarray(x, F64), np.asarray(g, F64), w, b)
        _close(y, y_ref, 1e-5, f"training output, step {t + 1}")
        _close(dx, dx_ref, 1e-5, f"input gradient, step {t + 1}")
        mean, var = bn.statistics(state)
        mean_ref, var_ref = ref.infer()
        _close(mean, mean_ref, 1e-5, f"running mean, step {t + 1}")
        _close(var, var_ref, 1e-5, f"running variance, step {t + 1}")
        if t % 10 == 9:
            y_inf, state_inf = apply(bn, x, state, inference=True)
            _close(y_inf, ref.inference(np.asarray(x, F64), w, b), 1e-5, "inference")
            assert_same(state_inf, state)  # inference changes nothing


def test_ema_matches_equinox_step_for_step(getkey):
    ours, state = make(3, approach="ema", momentum=0.9)
    theirs, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", momentum=0.9, mode="ema"
    )
    for t, x in enumerate(batches(getkey(), 20, (16, 3, 4))):
        g = jax.random.normal(getkey(), x.shape)
        y, dx, state = train_step(ours, x, g, state)
        y_eqx, dx_eqx, eqx_state = train_step(theirs, x, g, eqx_state)
        np.testing.assert_allclose(y, y_eqx, rtol=1e-5, atol=1e-5, err_msg=f"{t}")
        np.testing.assert_allclose(dx, dx_eqx, rtol=1e-5, atol=1e-5, err_msg=f"{t}")
        y_inf, _ = apply(ours, x, state, inference=True)
        y_inf_eqx, _ = apply(theirs, x, eqx_state, inference=True)
        np.testing.assert_allclose(y_inf, y_inf_eqx, rtol=1e-5, atol=1e-5)


def test_equinox_batch_mode_startup_bias(getkey):
    """Regression: eqx.nn.BatchNorm(mode="batch") starts its hidden variance at 1 and
    then zero-debiases it, so after one step on N(0, 2^2) data inference divides by
    sqrt(103) instead of 2. Here inference output std must be 1 within 2%."""
    bn, state = make(4)
    x = 2.0 * jax.random.normal(getkey(), (256, 4, 8))
    _, state = apply(bn, x, state)
    y, _ = apply(bn, x, state, inference=True)
    np.testing.assert_allclose(np.std(np.asarray(y), axis=(0, 2)), 1.0, rtol=0.02)
    np.testing.assert_allclose(
        bn.statistics(state)[1], np.var(x, axis=(0, 2), ddof=1), rtol=1e-5
    )


@pytest.mark.parametrize("approach", APPROACHES)
def test_inference_before_training_is_identity(approach, getkey):
    bn, state = make(5, approach=approach, eps=0.0)
    x = jax.random.normal(getkey(), (7, 5, 3))
    y, new_state = apply(bn, x, state, inference=True)
    np.testing.assert_array_equal(y, x)
    mean, var = bn.statistics(new_state)
    np.testing.assert_array_equal(mean, np.zeros(5))
    np.testing.assert_array_equal(var, np.ones(5))


@pytest.mark.parametrize("approach", APPROACHES)
def test_serialise_round_trip(approach, tmp_path, getkey):
    bn, state = make(3, approach=approach)
    bn = with_affine(bn, getkey())
    for x in batches(getkey(), 3, (8, 3, 2)):
        _, state = apply(bn, x, state)
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, (bn, state))
    like = make(3, approach=approach)
    bn2, state2 = eqx.tree_deserialise_leaves(path, like)
    x = batches(getkey(), 1, (8, 3, 2))[0]
    for inference in (True, False):
        y, s = apply(bn, x, state, inference=inference)
        y2, s2 = apply(bn2, x, state2, inference=inference)
        np.testing.assert_array_equal(y, y2)
        for a, b in zip(bn.statistics(s), bn2.statistics(s2)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_keeps_float32_statistics(dtype, getkey):
    """eqx.nn.BatchNorm normalises a bf16 batch of mean 1000 and std 1 to mean -1.02
    and std 0.04. Here statistics are float32: from the second step on (the first
    has no running mean to shift by), the batch is normalised to mean 0 and std 1 up
    to the rounding of the half-precision output."""
    bn, state = make(4, momentum=0.9)
    step = jax.jit(lambda x, s: apply(bn, x, s))
    for t in range(3):
        x = (1000 + jax.random.normal(getkey(), (64, 4, 16))).astype(dtype)
        y, state = step(x, state)
        assert y.dtype == dtype
        xs = np.asarray(x, F64)  # the values the layer actually saw
        mu = xs.mean((0, 2), keepdims=True)
        y_ref = (xs - mu) / np.sqrt(xs.var((0, 2), keepdims=True) + 1e-5)
        if t >= 1:
            half_ulp = float(jnp.finfo(dtype).eps)
            np.testing.assert_allclose(np.asarray(y, F64), y_ref, atol=4 * half_ulp * 4)
            yf = np.asarray(y, F64)
            assert np.all(np.abs(yf.mean((0, 2))) < 0.01)
            np.testing.assert_allclose(yf.std((0, 2)), 1.0, atol=0.01)
    mean, var = bn.statistics(state)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(mean) - 1000) < 0.5)


@pytest.mark.parametrize("approach", ["batch", "frozen"])
def test_large_offset_does_not_cancel(approach, getkey):
    """float32 data whose mean is 1000 standard deviations: from the second step on
    the training output matches float64 within 1e-3. (Approaches that normalise with
    running statistics carry the first step's rounding on in them, decaying at the
    rate of the momentum; see the BatchNorm docstring.)"""
    bn, state = make(3, approach=approach, momentum=0.9)
    ref = REFERENCES[approach](3, 0.9)
    ones = np.ones(3)
    for t in range(10):
        x = 1000.0 + jax.random.normal(getkey(), (32, 3, 8))
        g = jnp.zeros_like(x)
        y, _, state = train_step(bn, x, g, state)
        y_ref, _ = ref.step(np.asarray(x, F64), np.asarray(g, F64), ones, 0 * ones)
        if t >= 1:
            np.testing.assert_allclose(y, y_ref, atol=1e-3, err_msg=f"step {t + 1}")


_COLLECTIVES = {"psum", "pmean", "pmax", "pmin", "all_gather"}


def _collectives(jaxpr) -> list:
    """The collective equations of `jaxpr` and its sub-jaxprs, in order."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _COLLECTIVES:
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_collectives(sub))
    return found


def _depends_on_a_collective(jaxpr) -> bool:
    """Whether some collective's input is computed from another collective's output
    (as in a two-pass mean-then-variance), so that the two cannot be combined."""
    tainted: set = set()
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)]
        if eqn.primitive.name in _COLLECTIVES and any(v in tainted for v in ins):
            return True
        if eqn.primitive.name in _COLLECTIVES or any(v in tainted for v in ins):
            tainted.update(eqn.outvars)
    return False


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize("axis_name", ["batch", ("outer", "inner")])
def test_one_collective_per_call(approach, axis_name, getkey):
    """The batch mean and second moment are reduced by independent psums of C values
    each, which XLA combines into one all-reduce (`test_one_all_reduce_per_call`
    checks the compiled program); a mean-then-variance pass would need two."""
    bn, state = make(3, approach=approach, axis_name=axis_name)
    x = jax.random.normal(getkey(), (3, 4))

    def train(x):
        # A fresh copy each trace: a State may be used once.
        return bn(x, clone(state))[0]

    env = [
        (name, 4)
        for name in ((axis_name,) if isinstance(axis_name, str) else axis_name)
    ]
    jaxpr = jax.make_jaxpr(train, axis_env=env)(x)
    collectives = _collectives(jaxpr.jaxpr)
    assert [eqn.primitive.name for eqn in collectives] == ["psum", "psum"]
    assert all(eqn.outvars[0].aval.shape == (3,) for eqn in collectives)
    assert not _depends_on_a_collective(jaxpr.jaxpr)
    grad_jaxpr = jax.make_jaxpr(
        jax.grad(lambda x: jnp.sum(train(x) ** 2)), axis_env=env
    )(x)
    # The backward pass of each psum is one more (of the cotangents).
    assert len(_collectives(grad_jaxpr.jaxpr)) <= 4


def test_the_collective_test_sees_a_two_pass_layer(getkey):
    """`eqx.nn.BatchNorm` reduces the variance after the mean: the check above must
    tell that apart."""
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    x = jax.random.normal(getkey(), (3, 4))
    jaxpr = jax.make_jaxpr(lambda x: bn(x, state)[0], axis_env=[("batch", 4)])(x)
    assert _depends_on_a_collective(jaxpr.jaxpr)


def test_nested_axis_names_equal_one_flat_axis(getkey):
    flat, state = make(3, momentum=0.8)
    nested, nstate = make(3, momentum=0.8, axis_name=("outer", "inner"))
    for x in batches(getkey(), 4, (12, 3, 5)):
        y, state = apply(flat, x, state)
        f = jax.vmap(
            jax.vmap(nested, in_axes=(0, None), out_axes=(0, None), axis_name="inner"),
            in_axes=(0, None),
            out_axes=(0, None),
            axis_name="outer",
        )
        y2, nstate = f(x.reshape(3, 4, 3, 5), nstate)
        np.testing.assert_allclose(y2.reshape(y.shape), y, rtol=1e-5, atol=1e-6)
    for a, b in zip(flat.statistics(state), nested.statistics(nstate)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("approach", APPROACHES)
def test_non_finite_batch_leaves_state_unchanged(approach, getkey):
    """A NaN or inf batch between good ones: the state is bit-for-bit unchanged, and
    inference afterwards equals a run that never saw the bad batch."""
    bn, state = make(3, approach=approach)
    _, clean = make(3, approach=approach)
    good = batches(getkey(), 4, (8, 3, 2))
    for x in good[:2]:
        _, state = apply(bn, x, state)
        _, clean = apply(bn, x, clean)
    for poison in (jnp.nan, jnp.inf):
        bad = good[2].at[3, 1, 0].set(poison)
        y, after = jax.jit(lambda x, s: apply(bn, x, s))(bad, state)
        if bn.approach.needs_batch_variance:
            assert not np.all(np.isfinite(y[:, 1]))  # the output is what it is
        assert_same(after, state)
    _, state = apply(bn, good[3], state)
    _, clean = apply(bn, good[3], clean)
    y, _ = apply(bn, good[0], state, inference=True)
    y_clean, _ = apply(bn, good[0], clean, inference=True)
    np.testing.assert_array_equal(y, y_clean)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize("poison", [-jnp.inf, 3e38], ids=["-inf", "3e38"])
def test_bad_batches_never_change_the_state(approach, poison):
    """Negative infinity, and values whose square overflows float32 (NaN and
    infinity are `test_non_finite_batch_leaves_state_unchanged`'s): the state is
    bit-for-bit unchanged under `jit`, in every approach."""
    bn, state = make(3, approach=approach)
    for x in batches(jax.random.key(0), 2, (8, 3, 2)):
        _, state = apply(bn, x, state)
    before = leaves(state)
    bad = batches(jax.random.key(1), 1, (8, 3, 2))[0].at[2, 1, 0].set(poison)
    _, after = jax.jit(lambda x, s: apply(bn, x, s))(bad, state)
    assert_same(after, before)


def test_non_finite_new_running_statistics_are_refused():
    """Regression: the guard checked the batch statistics only; a strategy whose
    new running statistics overflow (or go negative) must leave the state
    unchanged."""

    class Overflowing(eqx_norm.Approach):
        def train(self, batch, running, momentum, eps):
            new = eqx_norm.RunningStats(
                running.mean + 1e38 * batch.mean * 1e38, -batch.var, running.counter + 1
            )
            return batch.mean, batch.var, new

    bn, state = make(3, approach=Overflowing())
    before = leaves(state)
    x = 1 + jax.random.normal(jax.random.key(0), (8, 3))
    y, after = apply(bn, x, state)
    assert_same(after, before)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize(
    "approach", ["batch", "ema", "adam-correction", "smooth-start", "renorm"]
)
def test_one_value_per_channel_is_a_clear_error(approach, getkey):
    bn, state = make(3, approach=approach)
    with pytest.raises(ValueError, match=r"one value per channel.*'frozen', 'running'"):
        apply(bn, jnp.ones((1, 3)), state)


@pytest.mark.parametrize("approach", ["frozen", "running"])
def test_batch_size_one_works_where_it_can(approach, getkey):
    bn, state = make(3, approach=approach)

    def loss(bn, x, state):
        y, state = apply(bn, x, state)
        return jnp.sum(y**2), state

    for _ in range(3):
        x = jax.random.normal(getkey(), (1, 3))
        grads, state = eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))(bn, x, state)
        assert np.all(np.isfinite(grads.weight))
    assert all(np.all(np.isfinite(a)) for a in bn.statistics(state))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"approach": "bach"}, ValueError, r"Unknown `approach='bach'`.*'batch'"),
        ({"approach": 3}, TypeError, "approach"),
        ({"momentum": -0.1}, ValueError, r"`momentum` must be in \[0, 1\)"),
        ({"momentum": 1.0}, ValueError, r"`momentum` must be in \[0, 1\)"),
        ({"momentum": 1.5}, ValueError, r"`momentum` must be in \[0, 1\)"),
        ({"eps": -1e-5}, ValueError, "`eps` must be finite and at least 0"),
        ({"input_size": 0}, ValueError, "`input_size` must be a positive int"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, error, message):
    kwargs = {"input_size": 3, "axis_name": "batch", **kwargs}
    with pytest.raises(error, match=message):
        eqx_norm.BatchNorm(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"input_size": -3}, ValueError, "`input_size` must be a positive int"),
        ({"input_size": 2.5}, TypeError, "input_size"),
        ({"input_size": True}, TypeError, "`input_size` must be a positive int"),
        ({"momentum": float("nan")}, ValueError, r"`momentum` must be in \[0, 1\)"),
        ({"momentum": float("inf")}, ValueError, r"`momentum` must be in \[0, 1\)"),
        ({"momentum": "0.9"}, TypeError, "momentum"),
        ({"momentum": np.array([0.9])}, TypeError, "`momentum` must be a real"),
        ({"eps": float("nan")}, ValueError, "`eps` must be finite and at least 0"),
        ({"eps": float("inf")}, ValueError, "`eps` must be finite and at least 0"),
        ({"dtype": jnp.int32}, ValueError, "`dtype` must be a floating dtype"),
        ({"approach": None}, TypeError, "approach"),
    ],
    ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__,
)
def test_more_bad_constructor_arguments(kwargs, error, message):
    """Values of the wrong type, NaN and infinities (the test above has values out
    of range)."""
    kwargs = {"input_size": 3, "axis_name": "batch", **kwargs}
    with pytest.raises(error, match=message):
        eqx_norm.BatchNorm(**kwargs)


def test_momentum_that_rounds_to_one_is_refused():
    """Regression: momentum 1 - 1e-9 passed the [0, 1) check but is 1.0 in
    float32, and the first update divided by zero."""
    with pytest.raises(ValueError, match="rounds to 1 in the statistics' dtype"):
        eqx_norm.BatchNorm(3, "batch", momentum=1 - 1e-9)


def test_numpy_and_jax_scalars_are_accepted_as_numbers():
    bn = eqx_norm.BatchNorm(
        np.int64(3), "batch", momentum=np.float32(0.9), eps=jnp.array(1e-3)
    )
    assert bn.input_size == 3 and isinstance(bn.momentum, float)
    assert bn.eps == pytest.approx(1e-3)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32, jnp.bool_, jnp.complex64])
@pytest.mark.parametrize("inference", [False, True])
def test_integer_input_is_a_type_error(dtype, inference):
    """Regression: a uint8 batch came back as uint8 garbage. Complex input is
    refused alike."""
    bn, state = make(3)
    with pytest.raises(TypeError, match=f"dtype {jnp.dtype(dtype)}.*Cast it first"):
        apply(bn, jnp.ones((4, 3), dtype), state, inference=inference)


@pytest.mark.parametrize("inference", [False, True])
def test_state_of_another_layer_is_refused(inference):
    """Regression: a 6-channel layer given a 1-channel layer's state normalised
    all six channels with its statistics."""
    _, state1 = make(1)
    bn6, _ = make(6)
    with pytest.raises(ValueError, match=r"input_size=6.*shape \(1,\), not \(6,\)"):
        apply(bn6, jnp.ones((4, 6)), state1, inference=inference)
    with pytest.raises(ValueError, match=r"input_size=6.*shape \(1,\)"):
        bn6.statistics(state1)


@pytest.mark.parametrize("inference", [False, True])
def test_state_returned_without_out_axes_names_out_axes(inference):
    """Regression: a `vmap` without `out_axes=(0, None)` returned the state stacked
    over the batch, and the next call said "the state of another layer ...
    make_with_state". The error now names the leading axis and `out_axes`."""
    bn, state = make(3)
    x = jax.random.normal(jax.random.key(0), (5, 3))
    _, stacked = jax.vmap(bn, in_axes=(0, None), axis_name="batch")(x, state)
    before = leaves(stacked)
    with pytest.raises(
        ValueError,
        match=r"running mean has shape \(5, 3\): a leading axis of 5 \(the batch "
        r"size\).*out_axes=\(0, None\)",
    ):
        apply(bn, x, stacked, inference=inference)
    with pytest.raises(ValueError, match=r"a leading axis of 5.*out_axes"):
        bn.statistics(stacked)
    assert_same(stacked, before)


def test_a_scalar_example_names_the_shape():
    bn, state = make(3)
    with pytest.raises(ValueError, match=r"input_size=3.*shape \(\)"):
        apply(bn, jnp.ones((4,)), state)


def test_wrong_channel_count_names_the_shape():
    bn, state = make(3)
    with pytest.raises(ValueError, match=r"input_size=3.*shape \(4, 2\)"):
        apply(bn, jnp.ones((5, 4, 2)), state)


def test_missing_axis_name_says_how_to_vmap():
    bn, state = make(3)
    with pytest.raises(NameError, match=r"no mapped axis named 'batch'.*jax.vmap"):
        apply(bn, jnp.ones((5, 3, 2)), state, axis_name="other")


def test_switching_approach_keeps_the_state(getkey):
    bn, state = make(3)
    for x in batches(getkey(), 5, (16, 3, 2)):
        _, state = apply(bn, x, state)
    before = bn.statistics(state)
    for approach in APPROACHES:
        other = bn.with_approach(approach)
        # Tracking keeps candidates besides, which `match_state` adds; for every
        # other approach it returns the state as it is.
        matched = eqx_norm.match_state(other, state)
        assert (approach == "tracking") != eqx.tree_equal(
            jax.eval_shape(lambda: matched), jax.eval_shape(lambda: state)
        )
        for a, b in zip(other.statistics(matched), before):
            np.testing.assert_array_equal(a, b)
        x = batches(getkey(), 1, (16, 3, 2))[0]
        _, trained = apply(other, x, clone(matched))
        assert jax.tree.structure(trained) == jax.tree.structure(matched)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(matched)):
            assert a.shape == b.shape and a.dtype == b.dtype
        # And back: every approach trains on a tracking state, keeping it.
        tracked = bn.with_approach("tracking")
        tracked_state = eqx_norm.match_state(tracked, state)
        _, trained = apply(other, x, clone(tracked_state))
        assert jax.tree.structure(trained) == jax.tree.structure(tracked_state)
    frozen = bn.with_approach("frozen")
    x = batches(getkey(), 1, (16, 3, 2))[0]
    y_train, state2 = apply(frozen, x, state)
    y_inf, _ = apply(frozen, x, state, inference=True)
    np.testing.assert_allclose(y_train, y_inf, rtol=1e-6, atol=1e-6)
    for a, b in zip(frozen.statistics(state2), before):
        np.testing.assert_array_equal(a, b)


def test_sequential_and_inference_mode(getkey):
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx.nn.Linear(4, 3, key=getkey()), eqx_norm.BatchNorm(3, "batch")]
    )
    x = jax.random.normal(getkey(), (10, 4))
    y, state = apply(model, x, state)
    np.testing.assert_allclose(np.mean(np.asarray(y), 0), 0, atol=1e-5)
    model_inf = eqx.nn.inference_mode(model)
    y_inf, state_inf = apply(model_inf, x, state)
    bn = model[1]
    assert isinstance(bn, eqx_norm.BatchNorm)
    h = jax.vmap(model[0])(x)
    mean, var = bn.statistics(state)
    np.testing.assert_allclose(
        y_inf, (h - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-6
    )
    assert_same(state_inf, state)


def test_channelwise_affine_off_and_dtype(getkey):
    bn, state = make(3, channelwise_affine=False)
    assert bn.weight is None and bn.bias is None
    x = batches(getkey(), 1, (8, 3))[0]
    y, state = apply(bn, x, state)
    xs = np.asarray(x, F64)
    np.testing.assert_allclose(
        y, (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5), rtol=1e-5, atol=1e-5
    )
    bn16, state16 = make(3, dtype=jnp.bfloat16)
    assert bn16.weight is not None and bn16.weight.dtype == jnp.bfloat16
    assert bn16.statistics(state16)[0].dtype == jnp.float32


# ------------------------------------------------------------- set_statistics

_JIT_OR_NOT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _set_statistics(bn, jit):
    """`bn.set_statistics`, or the same under `jax.jit` with every argument traced."""
    if jit:
        return jax.jit(lambda s, m, v, c: bn.set_statistics(s, m, v, counter=c))
    return lambda s, m, v, c: bn.set_statistics(s, m, v, counter=c)


@_JIT_OR_NOT
@pytest.mark.parametrize(
    "mean, var, counter, message",
    [
        ([np.nan, 0.0, 0.0], [1.0, 1.0, 1.0], 1, r"`mean` is not finite.*recalibrate"),
        ([0.0, 0.0, 0.0], [1.0, np.inf, 1.0], 1, r"`var` is not finite"),
        ([0.0, 0.0, 0.0], [1.0, -0.1, 1.0], 1, r"`var` has a negative value"),
        ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], -1, r"`counter` must be from 0"),
    ],
    ids=["nan-mean", "inf-var", "negative-var", "negative-counter"],
)
def test_set_statistics_under_jit_stored_nan_or_negative_statistics(
    mean, var, counter, message, jit, getkey
):
    """Under `jit` the statistics were stored unchecked: a NaN mean made the
    non-finite guard refuse every later training step. Now it is an error eagerly
    and at run time under `jit`, and the state stays as it was."""
    bn, state = make(3)
    mean, var = np.asarray(mean, np.float32), np.asarray(var, np.float32)
    if jit:
        counter = np.int32(counter)  # traced, as the statistics are
    with pytest.raises(RuntimeError if jit else ValueError, match=message):
        jax.block_until_ready(_set_statistics(bn, jit)(state, mean, var, counter))
    _, state = apply(bn, batches(getkey(), 1, (8, 3))[0], state)
    assert int(stored(state, bn.state_index).counter) == 1


@_JIT_OR_NOT
def test_set_statistics_under_jit_stores_good_statistics_and_a_traced_counter(jit):
    bn, state = make(3)
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([0.25, 4.0, 0.0])
    state = _set_statistics(bn, jit)(state, mean, var, np.int32(7))
    np.testing.assert_allclose(bn.statistics(state), (mean, var), rtol=1e-7)
    assert int(stored(state, bn.state_index).counter) == 7


@_JIT_OR_NOT
@pytest.mark.parametrize("name", ["mean", "var"])
def test_set_statistics_dropped_the_imaginary_part_of_complex_statistics(name, jit):
    """`[1+2j, 0, 0]` was stored as `[1, 0, 0]`; complex statistics are now a
    `TypeError`, as complex layer input is."""
    bn, state = make(3)
    stats = {"mean": np.zeros(3), "var": np.ones(3)}
    stats[name] = stats[name] + np.array([2j, 0, 0])
    with pytest.raises(TypeError, match=rf"`{name}` must hold real numbers.*complex"):
        _set_statistics(bn, jit)(state, stats["mean"], stats["var"], np.int32(1))


@_JIT_OR_NOT
def test_set_statistics_refused_bfloat16_statistics(jit):
    """Statistics in bfloat16 (a bfloat16 checkpoint's) were refused as "not real
    numbers", NumPy not counting bfloat16 as a floating type. They are stored
    exactly, in the statistics' float32, and checked as any others."""
    bn, state = make(3)
    mean = jnp.array([0.5, -1.25, 3.0], jnp.bfloat16)
    var = jnp.array([0.25, 4.0, 0.0], jnp.bfloat16)
    new = _set_statistics(bn, jit)(clone(state), mean, var, np.int32(2))
    stored = bn.statistics(new)
    assert stored[0].dtype == jnp.float32
    np.testing.assert_array_equal(stored, ([0.5, -1.25, 3.0], [0.25, 4.0, 0.0]))
    before = leaves(state)
    with pytest.raises(ValueError, match=r"`var` has a negative value"):
        bn.set_statistics(state, mean, -var - 1)
    assert_same(state, before)


@_JIT_OR_NOT
def test_set_statistics_converts_integers_and_refuses_booleans(jit):
    """Integer statistics (`[0, 0, 0]`, `[1, 1, 1]`) are numbers, stored exactly as
    floats; booleans are not statistics."""
    bn, state = make(3)
    set_ = _set_statistics(bn, jit)
    new = set_(clone(state), np.array([0, 1, -2]), np.array([1, 2, 3]), np.int32(1))
    assert bn.statistics(new)[0].dtype == jnp.float32
    np.testing.assert_array_equal(bn.statistics(new), ([0, 1, -2], [1, 2, 3]))
    with pytest.raises(TypeError, match=r"`var` must hold real numbers.*bool"):
        set_(state, np.zeros(3), np.ones(3, bool), np.int32(1))
