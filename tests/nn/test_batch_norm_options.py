"""BatchNorm's options for the layout of the data: `channel_axis` (channels on
any axis, e.g. last), `mask` (padded input: statistics of the selected values
only), `virtual_batch_size` (ghost batches, on one device and under `shard_map`);
and forward-mode autodiff (`jvp`, `jacfwd`, `linearize`, `hessian`) through a
training call with each. Every one is checked against a float64 reference or an
equivalent computation that does not use the option."""

import copy
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import eqx_norm

from ..helpers import (
    apply,
    as_a_user_calls_it,
    assert_close,
    assert_same,
    batches,
    clone,
    leaves,
    make,
    with_affine,
)
from ..reference import REFERENCES

F64 = np.float64
APPROACHES = list(eqx_norm.APPROACHES)
NEEDS_VARIANCE = {k: v.needs_batch_variance for k, v in eqx_norm.APPROACHES.items()}


def _step_fn(bn, x, state, mask=None, g=None):
    """The output, the input's gradient of sum(g * y), and the new state."""
    g = jnp.ones_like(x) if g is None else g

    def loss(x):
        y, new_state = apply(bn, x, state, mask=mask)
        return jnp.sum(g * y), (y, new_state)

    (_, (y, new_state)), dx = jax.value_and_grad(loss, has_aux=True)(x)
    return y, dx, new_state


_step = eqx.filter_jit(_step_fn)


# ------------------------------------------------------------------ channel_axis


@pytest.mark.parametrize(
    "approach, shape, channel_axis",
    [(a, (5, 3), -1) for a in APPROACHES] + [("batch", (2, 3, 4, 2), 1)],
    ids=[f"time-C-{a}" for a in APPROACHES] + ["4d-batch"],
)
def test_channel_axis_equals_channels_first(approach, shape, channel_axis, getkey):
    """Outputs, input gradients and state over 3 steps equal a `channel_axis=0`
    layer on the input with its channels moved first."""
    last, state = make(3, approach=approach, momentum=0.8, channel_axis=channel_axis)
    first, first_state = make(3, approach=approach, momentum=0.8)
    last, first = with_affine(last, getkey()), with_affine(first, getkey())
    first = eqx.tree_at(lambda m: (m.weight, m.bias), first, (last.weight, last.bias))

    def move(a):  # per example: the channel axis to the front (batch axis 0)
        return jnp.moveaxis(a, channel_axis % len(shape) + 1, 1)

    xs = batches(getkey(), 3, (8, *shape))
    for x in xs:
        g = jax.random.normal(getkey(), x.shape)
        y, dx, state = _step(last, x, state, g=g)
        y0, dx0, first_state = _step(first, move(x), first_state, g=move(g))
        np.testing.assert_allclose(move(y), y0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(move(dx), dx0, rtol=1e-4, atol=1e-5)
        assert_close(state, first_state, rtol=1e-6, atol=1e-7)
    y, _ = apply(last, xs[-1], state, inference=True)
    y0, _ = apply(first, move(xs[-1]), first_state, inference=True)
    np.testing.assert_allclose(move(y), y0, rtol=1e-5, atol=1e-5)


def test_wrong_channel_count_names_the_axis():
    bn, state = make(3, channel_axis=-1)
    with pytest.raises(ValueError, match=r"axis 1 has 4 values, not 3"):
        apply(bn, jnp.ones((2, 3, 4)), state)


def test_channel_axis_out_of_range_names_it():
    bn, state = make(3, channel_axis=2)
    with pytest.raises(ValueError, match=r"channel_axis=2.*shape \(3, 4\).*no axis"):
        apply(bn, jnp.ones((2, 3, 4)), state)


@pytest.mark.parametrize("value", [1.0, "last", True])
def test_channel_axis_must_be_an_int(value):
    with pytest.raises(TypeError, match="channel_axis"):
        eqx_norm.BatchNorm(3, "batch", channel_axis=value)


@pytest.mark.parametrize(
    "approach, shape, kwargs",
    [
        pytest.param("running", (3, 4, 5), {"mask": True}, marks=pytest.mark.slow),
        pytest.param(
            "renorm", (3, 4, 5), {"virtual_batch_size": 4}, marks=pytest.mark.slow
        ),
        ("batch", (4, 3, 5), {"channel_axis": 1, "mask": True}),
    ],
    ids=["running-mask", "renorm-ghost", "middle-axis-mask"],
)
def test_compute_channels_last_equals_the_default_layout(
    approach, shape, kwargs, getkey
):
    """`compute_channels_last=True` gives the outputs, input gradients, states and
    forward-mode tangents of the default layout, over 3 steps, in float64 (it only
    moves the channels to the last axis and back)."""
    kwargs = dict(kwargs)
    masked = kwargs.pop("mask", False)
    axis = kwargs.get("channel_axis", 0) % len(shape)
    xs = batches(getkey(), 3, (8, *shape))
    gs = [jax.random.normal(getkey(), x.shape) for x in xs]
    v = jax.random.normal(getkey(), xs[0].shape)
    mask_shape = (8,) + shape[:axis] + shape[axis + 1 :]
    mask = jax.random.bernoulli(getkey(), 0.8, mask_shape) if masked else None
    affine = with_affine(make(3)[0], getkey())
    with jax.enable_x64(True):
        f64 = jnp.float64
        xs, gs, v = (
            [x.astype(f64) for x in xs],
            [g.astype(f64) for g in gs],
            v.astype(f64),
        )
        layers = []
        for moved in (False, True):
            bn, state = make(
                3,
                approach=approach,
                momentum=0.8,
                dtype=f64,
                compute_channels_last=moved,
                **kwargs,
            )
            weight, bias = affine.weight.astype(f64), affine.bias.astype(f64)
            layers.append(
                (eqx.tree_at(lambda m: (m.weight, m.bias), bn, (weight, bias)), state)
            )
        (plain, state), (moved, moved_state) = layers
        for x, g in zip(xs, gs):
            y, dx, state = _step(plain, x, state, mask=mask, g=g)
            y1, dx1, moved_state = _step(moved, x, moved_state, mask=mask, g=g)
            np.testing.assert_allclose(y1, y, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(dx1, dx, rtol=1e-11, atol=1e-12)
            assert_close(moved_state, state, rtol=1e-12, atol=1e-12)

        def tangent(bn):
            return jax.jvp(lambda x: apply(bn, x, state, mask=mask)[0], (xs[0],), (v,))

        (y, t), (y1, t1) = tangent(plain), tangent(moved)
        np.testing.assert_allclose(y1, y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(t1, t, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("value", [1, None, "yes"])
def test_compute_channels_last_must_be_a_bool(value):
    with pytest.raises(TypeError, match="compute_channels_last"):
        eqx_norm.BatchNorm(3, "batch", compute_channels_last=value)


def _switch_option(where, value, model, bn):
    """`compute_channels_last=value` given to `model` (holding `bn`) through
    `where`: the constructor, the layer's method or the whole-model tool."""
    if where == "BatchNorm":
        return eqx_norm.BatchNorm(3, "batch", compute_channels_last=value)
    if where == "with_compute_channels_last":
        return bn.with_compute_channels_last(value)
    return eqx_norm.set_compute_channels_last(model, value)


@pytest.mark.parametrize(
    "where", ["BatchNorm", "with_compute_channels_last", "set_compute_channels_last"]
)
@pytest.mark.parametrize(
    "value",
    [jnp.asarray(True), np.float64("nan"), np.array([True]), "False"],
    ids=["jax-bool", "nan", "one-element-array", "string-False"],
)
def test_compute_channels_last_that_is_not_a_bool_is_refused_everywhere(value, where):
    """A JAX bool, NaN, a one-element array and the string "False" (which a
    truth test reads as True) are refused by the constructor, the method and the
    whole-model tool alike, naming the argument and the fix, as a user without
    the suite's type checks sees them; the model is unchanged."""
    model, _ = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx_norm.BatchNorm(3, "batch"), eqx_norm.BatchNorm(3, "batch")]
    )
    bn = cast(eqx_norm.BatchNorm, model[0])
    before = leaves(model)
    with (
        as_a_user_calls_it(),
        pytest.raises(
            TypeError,
            match=r"`compute_channels_last` must be True or False, got .* of type "
            r"\w+; for example `compute_channels_last=True`",
        ),
    ):
        _switch_option(where, value, model, bn)
    assert_same(model, before)
    assert [b.compute_channels_last for _, b in eqx_norm.batch_norms(model)] == [
        False,
        False,
    ]


@pytest.mark.parametrize(
    "where", ["with_compute_channels_last", "set_compute_channels_last"]
)
def test_compute_channels_last_traced_under_filter_jit_is_refused(where):
    """The option is static (it decides the layout of the program), so a flag
    traced by `eqx.filter_jit` is refused by name, not read as an array."""
    model, _ = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx_norm.BatchNorm(3, "batch")]
    )
    bn = cast(eqx_norm.BatchNorm, model[0])
    before = leaves(model)
    switch = eqx.filter_jit(lambda model, flag: _switch_option(where, flag, model, bn))
    with (
        as_a_user_calls_it(),
        pytest.raises(
            TypeError,
            match=r"`compute_channels_last` must be True or False, got \w*Tracer",
        ),
    ):
        switch(model, jnp.asarray(True))
    assert_same(model, before)


def _channels_last_call(case):
    """A layer with `compute_channels_last=True`, its state, and a bad call of it."""
    kwargs: dict[str, Any] = {"compute_channels_last": True}
    if case == "ghost-batch-that-does-not-divide":
        kwargs["virtual_batch_size"] = 3
    if case == "channel-axis-out-of-range":
        kwargs["channel_axis"] = 2
    bn, state = make(3, **kwargs)
    x = jnp.ones((4, 3, 5))
    calls = {
        "wrong-channel-count": lambda: apply(bn, jnp.ones((4, 4, 5)), state),
        "integer-input": lambda: apply(bn, jnp.ones((4, 3, 5), jnp.int32), state),
        "mask-of-another-shape": lambda: apply(
            bn, x, state, mask=jnp.ones((4, 6), bool)
        ),
        "one-value-per-channel": lambda: apply(bn, jnp.ones((1, 3, 1)), state),
        "ghost-batch-that-does-not-divide": lambda: apply(bn, x, state),
        "state-of-another-layer": lambda: apply(bn, x, make(4)[1]),
        "model-through-jax-jit": lambda: jax.jit(apply)(bn, x, state),
        "channel-axis-out-of-range": lambda: apply(bn, jnp.ones((4, 3)), state),
    }
    return bn, state, calls[case]


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("wrong-channel-count", ValueError, r"axis 0 has 4 values, not 3\. Check"),
        ("integer-input", TypeError, r"dtype int32.*Cast it first"),
        ("mask-of-another-shape", ValueError, r"`mask` of shape \(6,\).*\(5,\)"),
        ("one-value-per-channel", ValueError, r"one value per channel.*`approach=`"),
        (
            "ghost-batch-that-does-not-divide",
            ValueError,
            r"batch of 4 examples.*multiple of `virtual_batch_size`",
        ),
        ("state-of-another-layer", ValueError, r"shape \(4,\), not \(3,\)"),
        ("model-through-jax-jit", TypeError, r"traced array.*`eqx\.filter_jit`"),
        ("channel-axis-out-of-range", ValueError, r"channel_axis=2.*no axis 2"),
    ],
)
def test_a_channels_last_layer_refuses_bad_calls_as_the_default_does(
    case, error, message
):
    """Moving the channels last happens after the checks of the example, the mask,
    the state and the flags: each bad call is refused with the default layout's
    message, and the layer and its state are unchanged."""
    bn, state, call = _channels_last_call(case)
    before = leaves((bn, state))
    with pytest.raises(error, match=message):
        call()
    assert_same((bn, state), before)


@pytest.mark.parametrize(
    "where",
    ["bn", lambda bn: np.array([True, False])],
    ids=["a-string", "returns-an-array"],
)
def test_set_compute_channels_last_names_a_where_that_is_not_a_predicate(where):
    model, _ = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx_norm.BatchNorm(3, "batch")]
    )
    before = leaves(model)
    with (
        as_a_user_calls_it(),
        pytest.raises(
            TypeError,
            match=r"`set_compute_channels_last`: `where` must be a function of a "
            r"BatchNorm returning True or False",
        ),
    ):
        eqx_norm.set_compute_channels_last(model, where=where)
    assert_same(model, before)


# -------------------------------------------------------------------------- mask


def _masked_reference(approach, steps, rng):
    """Masked training of a (time=4, channels=3) channels-last layer against the
    float64 formula of `approach` over the selected values only."""
    bn, state = make(3, approach=approach, momentum=0.8, channel_axis=-1)
    ref = REFERENCES[approach](3, 0.8)
    least = 2 if NEEDS_VARIANCE[approach] else 1
    for t in range(steps):
        x = rng.normal(size=(6, 4, 3)) * rng.uniform(0.5, 3) + rng.normal(size=3)
        mask = rng.random((6, 4)) < 0.6
        if t == 3:
            mask[:] = False
        if t == 6:
            mask[:] = False
            mask[2, 1] = True
        before = clone(state)
        y, _, state = _step(bn, jnp.asarray(x, jnp.float32), state, jnp.asarray(mask))
        selected = x[mask]
        if len(selected) < least:
            mean, var = ref.infer()
            assert_same(state, before)
        else:
            mu, v = selected.mean(0), selected.var(0)
            mean, var, *_ = ref.stats(mu, v, len(selected))
        y_ref = (x - mean) / np.sqrt(var + 1e-5)
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-4, err_msg=f"{t}")
        for a, b in zip(bn.statistics(state), ref.infer()):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5, err_msg=f"{t}")


@pytest.mark.parametrize("approach", APPROACHES)
def test_mask_against_float64_formula(approach):
    """20 steps, a new mask each step, one step selecting nothing and one a single
    value: outputs and running statistics equal the formula on the selected values;
    the two degenerate steps leave the state bit-for-bit unchanged (where the
    approach needs more) and normalise with the inference statistics."""
    _masked_reference(approach, 20, np.random.default_rng(0))


def test_mask_matches_flax():
    """`approach="batch"` training output equals Flax linen's masked BatchNorm."""
    nn = pytest.importorskip("flax.linen", reason="Flax is a dev dependency")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 5, 3)) * 2 + 1, jnp.float32)
    mask = jnp.asarray(rng.random((8, 5)) < 0.5)
    flax_bn = nn.BatchNorm(
        use_running_average=False, use_fast_variance=False, axis=-1, epsilon=1e-5
    )
    variables = flax_bn.init(jax.random.key(0), x, mask=mask[..., None])
    y_flax, _ = flax_bn.apply(
        variables, x, mask=mask[..., None], mutable=["batch_stats"]
    )
    bn, state = make(3, channel_axis=-1)
    y, _, _ = _step(bn, x, state, mask)
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)


def test_whole_example_mask_equals_dropping_the_examples(getkey):
    bn, state = make(3, momentum=0.8)
    x = batches(getkey(), 1, (10, 3, 4))[0]
    keep = jnp.arange(10) % 3 != 0
    y, _, masked_state = _step(bn, x, clone(state), keep)
    y_kept, _, kept_state = _step(bn, x[keep], state)
    np.testing.assert_allclose(y[keep], y_kept, rtol=1e-6, atol=1e-6)
    assert_close(masked_state, kept_state, rtol=1e-5, atol=1e-6)


def test_all_true_mask_equals_no_mask(getkey):
    bn, state = make(3, approach="running")
    x = batches(getkey(), 1, (6, 3, 4))[0]
    y, dx, s1 = _step(bn, x, clone(state), jnp.ones((6, 4), bool))
    y0, dx0, s0 = _step(bn, x, state)
    np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx0, rtol=1e-5, atol=1e-6)
    assert_close(s1, s0, rtol=1e-5, atol=1e-6)


def test_mask_of_the_wrong_shape_or_dtype_is_refused():
    bn, state = make(3, channel_axis=-1)
    x = jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match=r"`mask` of shape \(4,\).*\(5,\)"):
        apply(bn, x, state, mask=jnp.ones((2, 4), bool))
    with pytest.raises(TypeError, match="mask"):
        apply(bn, x, state, mask=jnp.ones((2, 5)))


def test_nan_padding_does_not_poison_the_statistics(getkey):
    """Padding filled with NaN, masked out: the statistics are those of the real
    values and the real positions' outputs are finite. (Gradients are not: the
    output at a NaN position is NaN, and a zero cotangent times NaN is NaN in the
    scale's gradient, as in any framework; the guide says to pad with zeros.)"""
    bn, state = make(3, channel_axis=-1)
    x = batches(getkey(), 1, (4, 3, 5))[0].transpose(0, 2, 1)  # (batch, time, C)
    mask = jnp.arange(5)[None, :] < jnp.array([5, 3, 2, 4])[:, None]
    padded = jnp.where(mask[..., None], x, jnp.nan)
    y, dx, new_state = _step(
        bn, padded, clone(state), mask, g=jnp.where(mask[..., None], 1.0, 0.0)
    )
    _, _, expected = _step(bn, jnp.where(mask[..., None], x, 0.0), state, mask)
    assert_same(new_state, expected)
    assert np.all(np.isfinite(np.asarray(y)[np.asarray(mask)]))
    del dx


def test_mask_is_ignored_in_inference(getkey):
    bn, state = make(3)
    x = batches(getkey(), 1, (4, 3, 2))[0]
    y, _ = apply(bn, x, state, inference=True, mask=jnp.zeros((4, 2), bool))
    y0, _ = apply(bn, x, state, inference=True)
    np.testing.assert_array_equal(y, y0)


# ----------------------------------------------------------------- ghost batches


def _ghost_reference(ref, x, vbs):
    """Float64: each group's output and the running update of the ghost layer."""
    groups = [x[i : i + vbs] for i in range(0, len(x), vbs)]
    moments = []
    out = []
    for group in groups:
        mu, v = group.mean((0, 2)), group.var((0, 2))
        n = group.size // group.shape[1]
        mean, var, *_ = copy.deepcopy(ref).stats(mu, v, n)
        out.append((group - mean[:, None]) / np.sqrt(var + 1e-5)[:, None])
        moments.append((mu, v))
    mu = np.mean([m for m, _ in moments], 0)
    v = np.mean([v for _, v in moments], 0)
    ref.stats(mu, v, vbs * x.shape[2])
    return np.concatenate(out)


@pytest.mark.parametrize("approach", APPROACHES)
def test_ghost_batches_against_float64_formula(approach, getkey):
    """Each group is normalised as the layer would normalise it alone; the running
    statistics follow the formula on the mean over groups, for 4 steps."""
    bn, state = make(3, approach=approach, momentum=0.8, virtual_batch_size=4)
    plain, plain_state = make(3, approach=approach, momentum=0.8)
    ref = REFERENCES[approach](3, 0.8)
    for x in batches(getkey(), 4, (12, 3, 2)):
        y, _, new_state = _step(bn, x, state)
        for i in range(0, 12, 4):
            y_alone, _, _ = _step(plain, x[i : i + 4], clone(state))
            np.testing.assert_allclose(y[i : i + 4], y_alone, rtol=1e-5, atol=1e-5)
        y_ref = _ghost_reference(ref, np.asarray(x, F64), 4)
        np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-4)
        for a, b in zip(bn.statistics(new_state), ref.infer()):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        state = new_state
    del plain_state


def test_ghost_batch_of_whole_batch_equals_plain(getkey):
    bn, state = make(3, virtual_batch_size=8)
    plain, _ = make(3)
    x = batches(getkey(), 1, (8, 3, 2))[0]
    y, dx, s1 = _step(bn, x, clone(state))
    y0, dx0, s0 = _step(plain, x, state)
    np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx0, rtol=1e-5, atol=1e-6)
    assert_close(s1, s0, rtol=1e-5, atol=1e-6)


def test_ghost_batches_with_a_mask(getkey):
    """Each group is normalised over its selected values; a group that selects
    nothing is normalised with the inference statistics; the running update is the
    mean over the groups that trained."""
    bn, state = make(3, momentum=0.8, virtual_batch_size=4)
    plain, _ = make(3, momentum=0.8)
    x = batches(getkey(), 1, (12, 3, 2))[0]
    mask = jnp.asarray(np.random.default_rng(2).random((12, 2)) < 0.7)
    mask = mask.at[4:8].set(False)  # the second group selects nothing
    y, _, new_state = _step(bn, x, clone(state), mask)
    for i in (0, 8):
        alone, _, _ = _step(plain, x[i : i + 4], clone(state), mask[i : i + 4])
        np.testing.assert_allclose(y[i : i + 4], alone, rtol=1e-5, atol=1e-5)
    inferred, _ = apply(plain, x[4:8], state, inference=True)
    np.testing.assert_allclose(y[4:8], inferred, rtol=1e-6, atol=1e-6)
    ref = REFERENCES["batch"](3, 0.8)
    xs, ms = np.asarray(x, F64), np.asarray(mask)
    moments = []
    for i in (0, 8):
        sel = np.moveaxis(xs[i : i + 4], 1, -1)[ms[i : i + 4]]
        moments.append((sel.mean(0), sel.var(0), len(sel)))
    ref.stats(
        np.mean([m[0] for m in moments], 0),
        np.mean([m[1] for m in moments], 0),
        sum(m[2] for m in moments) // 2,
    )
    for a, b in zip(bn.statistics(new_state), ref.infer()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ghost_batch_that_does_not_divide_is_refused():
    bn, state = make(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"batch of 10 examples.*groups of that"):
        apply(bn, jnp.ones((10, 3, 2)), state)


def test_ghost_batch_of_one_value_is_refused():
    bn, state = make(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match="one value per channel in each ghost batch"):
        apply(bn, jnp.ones((4, 3)), state)


@pytest.mark.parametrize("value, error", [(0, ValueError), (2.0, TypeError)])
def test_bad_virtual_batch_size_is_refused(value, error):
    with pytest.raises(error, match="virtual_batch_size"):
        eqx_norm.BatchNorm(3, "batch", virtual_batch_size=value)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py)")
def test_ghost_batches_under_shard_map_equal_one_device(getkey):
    """Over 8 devices with 4 examples each, groups of 2 that lie within a device
    and of 8 that span two: the same as on one device, with a mask."""
    mesh = jax.make_mesh((8,), ("data",))
    x = batches(getkey(), 1, (32, 3, 2))[0]
    mask = jnp.asarray(np.random.default_rng(3).random((32, 2)) < 0.8)
    sharded = jax.sharding.NamedSharding(mesh, P("data"))
    xs, masks = jax.device_put(x, sharded), jax.device_put(mask, sharded)
    for vbs in (2, 8):
        bn, state = make(3, axis_name=("data", "batch"), virtual_batch_size=vbs)
        one, one_state = make(3, virtual_batch_size=vbs)
        body = jax.shard_map(
            lambda x, m, s: _step_fn(bn, x, s, m),
            mesh=mesh,
            in_specs=(P("data"), P("data"), P()),
            out_specs=(P("data"), P("data"), P()),
            check_vma=False,
        )
        y, dx, new_state = jax.jit(body)(xs, masks, state)
        y1, dx1, one_new = _step(one, x, one_state, mask)
        np.testing.assert_allclose(y, y1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, dx1, rtol=1e-4, atol=1e-5)
        assert_close(new_state, one_new, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ forward mode


_MODES = {
    "plain": {},
    "mask": {"mask": True},
    "ghost": {"virtual_batch_size": 2},
}


def _training_output(approach, mode, key, dtype=jnp.float32):
    """`(f, x, v)`: the training output of a layer after one step as a function `f`
    of the batch, a batch `x` and a direction `v`, all in `dtype` (float64 needs
    `jax.enable_x64`)."""
    kwargs = {k: v for k, v in _MODES[mode].items() if k != "mask"}
    k1, k2, k3 = jax.random.split(key, 3)
    with jax.enable_x64(False):  # the same random values for every dtype
        x0, x = batches(k2, 2, (4, 2, 3))
        weight, bias = jax.random.normal(k1, (2, 2)) * 0.5 + jnp.array([[1.0], [0.0]])
        v = jax.random.normal(k3, x.shape)
    bn, state = make(2, approach=approach, momentum=0.8, dtype=dtype, **kwargs)
    bn = eqx.tree_at(
        lambda m: (m.weight, m.bias), bn, (weight.astype(dtype), bias.astype(dtype))
    )
    x0, x, v = x0.astype(dtype), x.astype(dtype), v.astype(dtype)
    _, state = apply(bn, x0, state)
    mask = (jnp.arange(12).reshape(4, 3) % 5 != 0) if "mask" in _MODES[mode] else None

    def f(x):
        return apply(bn, x, state, mask=mask)[0]

    return f, x, v


@pytest.mark.parametrize(
    "approach, mode",
    [
        # Every approach plain and two with each option in the default tier; the
        # rest in the slow tier.
        pytest.param(
            a,
            m,
            marks=() if m == "plain" or a in ("batch", "running") else pytest.mark.slow,
        )
        for a in APPROACHES
        for m in _MODES
    ],
)
def test_jvp_equals_finite_differences_and_jacfwd_equals_jacrev(approach, mode, getkey):
    """In float64: `jax.jvp` of a training call equals central differences, and
    `jax.jacfwd` equals `jax.jacrev`. (Renorm's corrections are stop-gradients, so
    its derivative is not that of the function: it is compared with differences
    where the corrections are pinned, `r_max=1, d_max=0`.)"""
    key = getkey()
    pinned = eqx_norm.Renorm(r_max=1.0, d_max=0.0) if approach == "renorm" else None
    h = 1e-6
    with jax.enable_x64(True):
        f, x, v = _training_output(pinned or approach, mode, key, jnp.float64)
        tangent, fd = jax.jit(
            lambda x, v: (
                jax.jvp(f, (x,), (v,))[1],
                (f(x + h * v) - f(x - h * v)) / (2 * h),
            )
        )(x, v)
        np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-7)
        if pinned is not None:
            f, x, _ = _training_output(approach, mode, key, jnp.float64)
        forward, reverse = jax.jit(lambda x: (jax.jacfwd(f)(x), jax.jacrev(f)(x)))(x)
        np.testing.assert_allclose(forward, reverse, rtol=1e-10, atol=1e-12)


def test_linearize_agrees_with_jvp(getkey):
    f, x, v = _training_output("renorm", "mask", getkey())
    linear, tangent = jax.jit(
        lambda x, v: (jax.linearize(f, x)[1](v), jax.jvp(f, (x,), (v,))[1])
    )(x, v)
    np.testing.assert_allclose(linear, tangent, rtol=1e-6)


@pytest.mark.parametrize("approach", ["batch", "ema", "running"])
def test_hessian_equals_float64_reference(approach, getkey):
    """`jax.hessian` of a small loss through the layer, in float32, equals central
    differences of the float64 gradient."""
    key = getkey()
    f32, x, _ = _training_output(approach, "plain", key)

    def loss(f):
        return lambda x: jnp.sum(jnp.sin(f(x)))

    hessian = jax.jit(jax.hessian(loss(f32)))(x)
    with jax.enable_x64(True):
        f64, x64, _ = _training_output(approach, "plain", key, jnp.float64)
        grad = jax.jit(jax.grad(loss(f64)))
        h = 1e-5
        flat = x64.reshape(-1)
        columns = []
        for i in range(flat.size):
            e = jnp.zeros_like(flat).at[i].set(h).reshape(x64.shape)
            columns.append((grad(x64 + e) - grad(x64 - e)) / (2 * h))
        reference = jnp.stack(columns, -1).reshape(x64.shape * 2)
    np.testing.assert_allclose(hessian, reference, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("flag", ["compute_channels_last", "inference"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_flag_set_by_tree_at_to_a_non_bool_is_named(flag, value):
    """`eqx.tree_at` sets a field without the constructor's check: a flag set to
    `"yes"` or `1` was taken as true, silently. Now the call names the flag."""
    bn, state = make(3)
    bad = eqx.tree_at(lambda b: getattr(b, flag), bn, value)
    before = leaves(state)
    with pytest.raises(TypeError, match=rf"`{flag}` must be True or False"):
        apply(bad, jnp.ones((4, 3, 2)), state)
    assert_same(state, before)
