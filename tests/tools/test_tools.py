from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_norm

from ..helpers import (
    MLP,
    apply,
    assert_close,
    assert_same,
    bn_at,
    clone,
    leaves,
    stored,
    trained_mlp,
)

F64 = np.float64


def _inputs(key, n=32, shift=3.0):
    """Inputs only (no targets) for `MLP`: `n` examples of mean `shift` and
    standard deviation 2."""
    return shift + 2 * jax.random.normal(key, (n, 4))


def _train(model, state, key, steps=3):
    for k in jax.random.split(key, steps):
        _, state = apply(model, _inputs(k), state)
    return state


def test_set_approach_and_freeze(getkey):
    model, state = eqx.nn.make_with_state(MLP)()
    state = _train(model, state, getkey())
    frozen = eqx_norm.freeze(model)
    assert all(
        isinstance(b.approach, eqx_norm.Frozen) for _, b in eqx_norm.batch_norms(frozen)
    )
    x = _inputs(getkey())
    y_train, new_state = apply(frozen, x, state)
    y_infer, _ = apply(frozen, x, state, inference=True)
    np.testing.assert_allclose(y_train, y_infer, rtol=1e-6, atol=1e-6)
    assert_same(new_state, state)
    # `where` picks layers; others keep their approach.
    partial = eqx_norm.set_approach(model, "running", where=lambda b: b.input_size == 5)
    assert isinstance(bn_at(partial, 1).approach, eqx_norm.Batch)
    assert isinstance(bn_at(partial, 4).approach, eqx_norm.Running)
    _, s2 = apply(partial, x, state)
    assert jax.tree.structure(s2) == jax.tree.structure(state)
    with pytest.raises(ValueError, match="`where` matched no BatchNorm"):
        eqx_norm.freeze(model, where=lambda b: False)
    with pytest.raises(ValueError, match="Unknown `approach='fozen'`"):
        eqx_norm.set_approach(model, "fozen")


@pytest.mark.parametrize("approach", ["frozen", "running"])
def test_fine_tuning_with_batch_size_one(approach, getkey):
    model, state = eqx.nn.make_with_state(MLP)()
    state = _train(model, state, getkey())
    model = eqx_norm.set_approach(model, approach)

    @eqx.filter_jit
    def step(model, state, x, y):
        def loss(model):
            pred, new_state = apply(model, x, state)
            return jnp.mean((pred - y) ** 2), new_state

        (value, new_state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.01 * g, grads))
        return model, new_state, value, grads

    for _ in range(5):
        x, y = _inputs(getkey(), n=1), jax.random.normal(getkey(), (1, 2))
        model, state, value, grads = step(model, state, x, y)
        assert np.isfinite(value)
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    if approach == "frozen":
        x = _inputs(getkey(), n=1)
        y_train, _ = apply(model, x, state)
        y_infer, _ = apply(model, x, state, inference=True)
        np.testing.assert_allclose(y_train, y_infer, rtol=1e-6, atol=1e-6)


class EqxCNN(eqx.Module):
    layers: eqx.nn.Sequential

    def __init__(self, mode, key):
        k1, k2 = jax.random.split(key)
        self.layers = eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(1, 3, 3, key=k1),
                eqx.nn.BatchNorm(3, "batch", mode=mode, momentum=0.9),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Lambda(jnp.ravel),
                eqx.nn.Linear(3 * 6 * 6, 4, key=k2),
                eqx.nn.BatchNorm(4, "batch", mode=mode, momentum=0.9),
            ]
        )

    def __call__(self, x, state):
        return self.layers(x, state)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_from_equinox_keeps_inference_outputs(mode, getkey):
    model, state = eqx.nn.make_with_state(EqxCNN)(mode, getkey())
    x = 1 + jax.random.normal(getkey(), (16, 1, 8, 8))

    @eqx.filter_jit
    def sgd_step(model, state, x):
        def loss(model):
            y, new_state = apply(model, x, state)
            return jnp.mean((y - 1) ** 2), new_state

        grads, new_state = eqx.filter_grad(loss, has_aux=True)(model)
        return eqx.apply_updates(
            model, jax.tree.map(lambda g: -0.1 * g, grads)
        ), new_state

    for _ in range(4):
        model, state = sgd_step(
            model, state, x + 0.3 * jax.random.normal(getkey(), x.shape)
        )
    ours, our_state = eqx_norm.from_equinox(model, state)
    layers = eqx_norm.batch_norms(ours)
    assert [p for p, _ in layers] == [".layers.layers[1]", ".layers.layers[5]"]
    assert all(
        type(b.approach).__name__ == ("Batch" if mode == "batch" else "EMA")
        for _, b in layers
    )
    y_eqx, _ = apply(model, x, state, inference=True)
    y_ours, _ = apply(ours, x, our_state, inference=True)
    np.testing.assert_allclose(y_ours, y_eqx, rtol=1e-6, atol=1e-6)
    if mode == "ema":
        # Training goes on as Equinox's would.
        _, s1 = apply(model, x, state)
        _, s2 = apply(ours, x, our_state)
        np.testing.assert_allclose(
            apply(ours, x, s2, inference=True)[0],
            apply(model, x, s1, inference=True)[0],
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="found no `eqx.nn.BatchNorm`"):
        eqx_norm.from_equinox(ours, our_state)


def test_from_equinox_can_compute_channels_last(getkey):
    """`compute_channels_last=True` reaches every converted layer, and a training
    step then gives what the default layers give; a non-bool is refused before any
    conversion."""
    model, state = eqx.nn.make_with_state(EqxCNN)("batch", getkey())
    x = 1 + jax.random.normal(getkey(), (16, 1, 8, 8))
    plain, plain_state = eqx_norm.from_equinox(model, state)
    moved, moved_state = eqx_norm.from_equinox(model, state, compute_channels_last=True)
    assert [b.compute_channels_last for _, b in eqx_norm.batch_norms(moved)] == [
        True,
        True,
    ]
    y, s = apply(plain, x, plain_state)
    y_moved, s_moved = apply(moved, x, moved_state)
    np.testing.assert_allclose(y_moved, y, rtol=1e-5, atol=1e-5)
    assert_close(s_moved, s, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="compute_channels_last"):
        eqx_norm.from_equinox(model, state, compute_channels_last="yes")  # pyright: ignore


def test_set_compute_channels_last_keeps_the_state_and_the_values(getkey):
    """The tool sets the option on the layers `where` selects and leaves the rest;
    the state made for the model before stays valid, and a training step gives
    what the default layers give. The method switches one layer both ways."""
    model, state = eqx.nn.make_with_state(EqxCNN)("batch", getkey())
    model, state = eqx_norm.from_equinox(model, state)
    x = 1 + jax.random.normal(getkey(), (16, 1, 8, 8))
    first = eqx_norm.set_compute_channels_last(
        model, where=lambda bn: bn.input_size == 3
    )
    assert [b.compute_channels_last for _, b in eqx_norm.batch_norms(first)] == [
        True,
        False,
    ]
    moved = eqx_norm.set_compute_channels_last(model)
    assert all(b.compute_channels_last for _, b in eqx_norm.batch_norms(moved))
    y, s = apply(model, x, state)
    y_moved, s_moved = apply(moved, x, state)
    np.testing.assert_allclose(y_moved, y, rtol=1e-5, atol=1e-5)
    assert_close(s_moved, s, rtol=1e-5, atol=1e-6)
    bn = eqx_norm.batch_norms(moved)[0][1]
    back = bn.with_compute_channels_last(False)
    assert (back.compute_channels_last, bn.compute_channels_last) == (False, True)
    assert back.state_index.marker == bn.state_index.marker  # the same state entry
    with pytest.raises(TypeError, match="compute_channels_last"):
        eqx_norm.set_compute_channels_last(model, 1)  # pyright: ignore
    with pytest.raises(TypeError, match="compute_channels_last"):
        bn.with_compute_channels_last("no")  # pyright: ignore
    with pytest.raises(ValueError, match="`set_compute_channels_last`: `where`"):
        eqx_norm.set_compute_channels_last(model, where=lambda bn: False)


def _layer_inputs(model, x):
    """Float64 inputs of both BatchNorm layers when each normalises with its batch
    statistics (what recalibration sees)."""
    lin1, bn1, _, lin2, bn2 = (model.layers[i] for i in range(5))
    h1 = np.asarray(x, F64) @ np.asarray(lin1.weight, F64).T
    mu, v = h1.mean(0), h1.var(0)
    y1 = (h1 - mu) / np.sqrt(v + bn1.eps) * np.asarray(bn1.weight, F64) + np.asarray(
        bn1.bias, F64
    )
    h2 = np.maximum(y1, 0) @ np.asarray(lin2.weight, F64).T
    return h1, h2


def test_recalibrate_equals_float64_population_statistics(getkey):
    model, state = eqx.nn.make_with_state(MLP)("ema")
    state = _train(model, state, getkey())
    batches = [_inputs(getkey(), n=16, shift=float(i)) for i in range(4)]
    new_state = eqx_norm.recalibrate(model, state, iter(batches))
    for layer, index in ((0, 1), (1, 4)):
        inputs = [_layer_inputs(model, b)[layer] for b in batches]
        mus = np.stack([h.mean(0) for h in inputs])
        mean = mus.mean(0)
        var = np.mean([h.var(0) + (h.mean(0) - mean) ** 2 for h in inputs], axis=0)
        np.testing.assert_allclose(var, np.concatenate(inputs).var(0), rtol=1e-12)
        got_mean, got_var = bn_at(model, index).statistics(new_state)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_var, var, rtol=1e-5)
        assert int(stored(new_state, bn_at(model, index).state_index).counter) == 4
    with pytest.raises(ValueError, match="got no batches"):
        eqx_norm.recalibrate(model, state, [])
    bad = batches[0].at[0, 0].set(jnp.nan)
    with pytest.raises(
        ValueError, match=r"batch 1 gave non-finite statistics.*layers\[1\]"
    ):
        eqx_norm.recalibrate(model, state, [batches[0], bad])


@pytest.mark.slow  # 7 s
def test_forum_case_dead_channel_found_and_repaired(getkey):
    """The PyTorch forum case: a running variance of 5.6e-45 in one channel makes
    inference blow up; diagnose finds it, recalibrate repairs it, after which
    inference matches training-mode outputs on the same data."""
    model, state = eqx.nn.make_with_state(MLP)()
    state = _train(model, state, getkey())
    bn = bn_at(model, 1)
    stats = stored(state, bn.state_index)
    state = state.set(bn.state_index, stats._replace(var=stats.var.at[2].set(5.6e-45)))
    x = _inputs(getkey(), n=64)
    report = eqx_norm.diagnose(model, state, x)
    assert [d.path for d in report.layers] == [".layers.layers[1]", ".layers.layers[4]"]
    assert report[0].dead_channels.tolist() == [2]
    assert report[1].dead_channels.size == 0
    assert report[0].max_gap > 10 * report[1].max_gap
    text = str(report)
    assert ".layers.layers[1]" in text and "recalibrate" in text
    y_train, _ = apply(model, x, state)
    y_bad, _ = apply(model, x, state, inference=True)
    assert np.max(np.abs(y_bad - y_train)) > 1
    repaired = eqx_norm.recalibrate(model, state, [x])
    y_inf, _ = apply(model, x, repaired, inference=True)
    np.testing.assert_allclose(y_inf, y_train, rtol=1e-5, atol=1e-5)
    assert eqx_norm.diagnose(model, repaired, x)[0].max_gap < 1e-4


@pytest.mark.parametrize("approach", ["batch", "ema", "smooth-start", "renorm"])
def test_diagnose_gap_equals_measured_gap(approach, getkey):
    bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(
        3, "batch", approach=approach, momentum=0.9
    )
    bn = eqx.tree_at(
        lambda b: (b.weight, b.bias),
        bn,
        (jnp.array([1.0, 2.0, 0.5]), jnp.array([0.1, -0.2, 0.3])),
    )
    for k in jax.random.split(getkey(), 3):
        _, state = apply(bn, 1 + jax.random.normal(k, (16, 3, 4)), state)
    x = 2 + 3 * jax.random.normal(getkey(), (16, 3, 4))
    d = eqx_norm.diagnose(bn, state, x)[0]
    y_train, _ = apply(bn, x, clone(state))
    y_infer, _ = apply(bn, x, state, inference=True)
    measured = np.sqrt(
        np.mean((np.asarray(y_train, F64) - np.asarray(y_infer, F64)) ** 2, axis=(0, 2))
    )
    np.testing.assert_allclose(d.gap, measured, rtol=1e-4, atol=1e-6)
    xs = np.asarray(x, F64)
    np.testing.assert_allclose(d.batch_mean, xs.mean((0, 2)), rtol=1e-5)
    np.testing.assert_allclose(d.batch_var, xs.var((0, 2)), rtol=1e-4)


def test_diagnose_flags_non_finite_statistics(getkey):
    model, state = eqx.nn.make_with_state(MLP)()
    bn = bn_at(model, 4)
    stats = stored(state, bn.state_index)
    state = state.set(
        bn.state_index, stats._replace(mean=stats.mean.at[1].set(jnp.inf))
    )
    report = eqx_norm.diagnose(model, state, _inputs(getkey()))
    assert report[1].nonfinite_channels.tolist() == [1]


class _SkipsSecond(eqx.Module):
    """Two BatchNorm layers, of which only the first is called."""

    first: eqx_norm.BatchNorm
    second: eqx_norm.BatchNorm

    def __init__(self):
        self.first = eqx_norm.BatchNorm(4, "batch")
        self.second = eqx_norm.BatchNorm(4, "batch")

    def __call__(self, x, state):
        return self.first(x, state)


def test_tools_name_a_layer_the_model_does_not_call(getkey):
    """The batch statistics come back in the state the model returns; a layer that
    was not called has none, and the tools say which."""
    model, state = eqx.nn.make_with_state(_SkipsSecond)()
    x = _inputs(getkey(), n=8)
    with pytest.raises(ValueError, match=r"layer at '.second' was not called"):
        eqx_norm.diagnose(model, state, x)
    with pytest.raises(ValueError, match=r"layer at '.second' was not called"):
        eqx_norm.recalibrate(model, state, [x])


class _OutputOnly(eqx.Module):
    model: MLP

    def __call__(self, x, state):
        return self.model(x, state)[0]


def test_tools_need_the_model_to_return_its_state(getkey):
    model, state = eqx.nn.make_with_state(MLP)()
    with pytest.raises(ValueError, match=r"`diagnose`.*returned 0 `eqx.nn.State`"):
        eqx_norm.diagnose(_OutputOnly(model), state, _inputs(getkey()))


def test_diagnose_of_a_frozen_model_works_with_one_example(getkey):
    """A recording pass keeps each layer's own approach, so a frozen model (which
    needs no batch variance) can be diagnosed on a single example."""
    model, state = eqx.nn.make_with_state(MLP)()
    state = _train(model, state, getkey())
    frozen = eqx_norm.freeze(model)
    report = eqx_norm.diagnose(frozen, state, _inputs(getkey(), n=1))
    assert [d.approach for d in report.layers] == ["Frozen", "Frozen"]
    np.testing.assert_allclose(report[0].gap, 0, atol=1e-6)


def test_recalibrate_errors_name_public_things():
    """Regression: on a frozen model with batch size 1 the error named the
    internal `_Record()` strategy and advised switching to 'frozen'; layers named
    "batch" and ("batch",) were told to pass a `forward=` that does not exist."""
    model, state = trained_mlp()
    one = jnp.ones((1, 4))
    for tool, args in (
        (eqx_norm.recalibrate, (eqx_norm.freeze(model), state, [one])),
        (eqx_norm.diagnose, (model, state, one)),
    ):
        with pytest.raises(ValueError) as info:
            tool(*args)
        message = str(info.value)
        assert "at least 2 examples" in message and tool.__name__ in message
        assert "_R" not in message and "forward=" not in message
    # "batch" and ("batch",) are the same axis.
    x = _inputs(jax.random.key(2), n=16)
    mixed, mixed_state = _mlp_with_last_axis(("batch",))
    new_state = eqx_norm.recalibrate(mixed, mixed_state, [x])
    assert np.all(np.isfinite(bn_at(mixed, 4).statistics(new_state)[1]))
    other, other_state = _mlp_with_last_axis("other")
    with pytest.raises(ValueError, match="one `axis_name` for every BatchNorm"):
        eqx_norm.recalibrate(other, other_state, [x])


def _mlp_with_last_axis(axis_name):
    def build():
        return eqx.tree_at(
            lambda m: m.layers.layers[4],
            MLP(),
            eqx_norm.BatchNorm(5, axis_name, momentum=0.9),
            is_leaf=lambda x: isinstance(x, eqx_norm.BatchNorm),
        )

    return eqx.nn.make_with_state(build)()


def test_recalibrate_with_a_non_finite_batch_leaves_the_state():
    model, state = trained_mlp()
    before = leaves(state)
    bad = jnp.ones((8, 4)).at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="batch 0 gave non-finite statistics"):
        eqx_norm.recalibrate(model, state, [bad])
    assert_same(state, before)


@pytest.mark.parametrize("approach", ["batch", "tracking"])
def test_a_stored_mean_that_is_not_finite_is_repaired_by_recalibrate(approach):
    """A running mean that is not finite (a state set by hand, a port of a
    corrupted PyTorch buffer): training still normalises with the batch's own
    statistics (finite output), and `recalibrate` repairs the statistics. Pins the
    shift's check: with the stored mean taken as the shift unchecked, every
    training output was NaN and `recalibrate` refused the model."""
    model, state = trained_mlp(approach)
    bn = bn_at(model, 1)
    running = cast(eqx_norm.RunningStats, state.get(bn.state_index))
    corrupt = clone(state).set(
        bn.state_index, running._replace(mean=running.mean.at[0].set(jnp.nan))
    )
    x = 3 + 2 * jax.random.normal(jax.random.key(7), (16, 4))
    y, _ = apply(model, x, clone(corrupt))
    assert np.all(np.isfinite(np.asarray(y)))
    batches = [
        3 + 2 * jax.random.normal(k, (16, 4))
        for k in jax.random.split(jax.random.key(8), 4)
    ]
    repaired = eqx_norm.recalibrate(model, clone(corrupt), batches)
    mean, var = bn.statistics(repaired)
    assert np.all(np.isfinite(np.asarray(mean))) and np.all(
        np.isfinite(np.asarray(var))
    )
    expected = eqx_norm.recalibrate(model, clone(state), batches)
    assert_close(bn.statistics(repaired), bn.statistics(expected), rtol=1e-6)


def test_set_approach_where_matching_nothing():
    model, _ = trained_mlp()
    with pytest.raises(ValueError, match="`where` matched no BatchNorm"):
        eqx_norm.set_approach(model, "ema", where=lambda bn: bn.input_size == 99)


@pytest.mark.parametrize(
    "tool", ["recalibrate", "diagnose", "set_approach", "set_compute_channels_last"]
)
def test_tools_on_a_model_without_batch_norm(tool):
    linear = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    _, state = trained_mlp()
    call = {
        "recalibrate": lambda: eqx_norm.recalibrate(linear, state, [jnp.ones((2, 2))]),
        "diagnose": lambda: eqx_norm.diagnose(linear, state, jnp.ones((2, 2))),
        "set_approach": lambda: eqx_norm.set_approach(linear, "ema"),
        "set_compute_channels_last": lambda: eqx_norm.set_compute_channels_last(linear),
    }[tool]
    message = f"`{tool}` found no `eqx_norm.BatchNorm`.*from_equinox"
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("kind", ["jax", "numpy"])
def test_recalibrate_given_one_array_names_batches(kind):
    """Regression: `recalibrate(model, state, x_train)` read the array as a batch
    per example and failed inside the model's first layer."""
    model, state = trained_mlp()
    x = _inputs(jax.random.key(3), n=64)
    before = leaves(state)
    with pytest.raises(
        ValueError,
        match=r"`batches` is one array of shape \(64, 4\).*iterable of batches.*"
        r"x\[i : i \+ 256\]",
    ):
        eqx_norm.recalibrate(model, state, x if kind == "jax" else np.asarray(x))
    assert_same(state, before)


def _moved(model):
    """The MLP with its first layer's weights moved (scaled and shifted), as a
    high learning rate moves them in a few steps: its running statistics now lag."""
    first = model.layers.layers[0]
    return eqx.tree_at(
        lambda m: m.layers.layers[0].weight, model, 1.8 * first.weight + 0.3
    )


@pytest.mark.parametrize(
    "approach", ["batch", pytest.param("tracking", marks=pytest.mark.slow)]
)
def test_diagnose_says_when_running_statistics_lag_and_not_once_recalibrated(
    approach, getkey
):
    """The verdict: on a model whose weights moved after its statistics were kept,
    `diagnose` names the layers and the fixes; on the same model recalibrated, and
    on one trained to a stable population (40 steps, no drift), it says nothing."""
    model, state = trained_mlp(approach, steps=40)
    x = _inputs(getkey(), n=64)
    settled = eqx_norm.diagnose(model, state, x)
    assert settled.verdict is None and not settled.lagging
    assert all(d.mismatch < 8 for d in settled)
    moved = _moved(model)
    lagging = eqx_norm.diagnose(moved, state, x)
    assert lagging.verdict is not None and lagging.lagging[0] is lagging[0]
    assert lagging[0].mismatch > 40
    text = str(lagging)
    assert "state = eqx_norm.recalibrate(model, state, batches)" in text
    assert 'approach="tracking"' in text and ".layers.layers[1]" in text
    batches = [_inputs(k, n=64) for k in jax.random.split(getkey(), 20)]
    fixed = eqx_norm.recalibrate(moved, state, batches)
    after = eqx_norm.diagnose(moved, fixed, x)
    assert after.verdict is None and "recalibrate" not in str(after)
    assert all(d.mismatch < 8 for d in after)


def test_diagnose_gives_no_verdict_where_training_uses_the_running_statistics():
    """`ema` and `frozen` normalise training batches with (mostly) the running
    statistics: their training and inference outputs agree even on moved weights,
    so there is no train/inference disagreement to report."""
    for approach in ("ema", "frozen"):
        model, state = trained_mlp(approach, steps=40)
        d = eqx_norm.diagnose(_moved(model), state, _inputs(jax.random.key(4), n=64))
        assert d.verdict is None, approach


def test_diagnose_mismatch_is_the_formula(getkey):
    """`mismatch` is D over its value under sampling noise, with D the mean over
    channels of (mu_t - mu_i)^2 / (v_t + eps) + (v_t - v_i)^2 / (2 (v_t + eps)^2)
    and the noise from the variance of four groups' statistics over 4, in float64;
    NaN for a batch of fewer than 4 examples."""
    bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(3, "batch", momentum=0.9)
    for k in jax.random.split(getkey(), 3):
        _, state = apply(bn, 1 + jax.random.normal(k, (16, 3, 4)), state)
    x = 2 + 3 * jax.random.normal(getkey(), (10, 3, 4))
    d = eqx_norm.diagnose(bn, state, x)[0]
    xs = np.asarray(x, F64)
    mu, v = xs.mean((0, 2)), xs.var((0, 2))
    mi, vi = (np.asarray(a, F64) for a in bn.statistics(state))
    s = v + bn.eps

    def divergence(dm, dv):
        return np.mean(dm**2 / s + dv**2 / (2 * s**2))

    groups = [xs[lo:hi] for lo, hi in ((0, 2), (2, 5), (5, 7), (7, 10))]
    means = np.stack([g.mean((0, 2)) for g in groups])
    variances = np.stack([g.var((0, 2)) for g in groups])
    noise = np.mean(
        means.var(0, ddof=1) / 4 / s + variances.var(0, ddof=1) / 4 / (2 * s**2)
    )
    expected = divergence(mu - mi, v - vi) / noise
    np.testing.assert_allclose(d.mismatch, expected, rtol=1e-4)
    assert np.isnan(eqx_norm.diagnose(bn, state, x[:3])[0].mismatch)
