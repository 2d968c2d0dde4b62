"""Serving and porting: folding BatchNorm into the layer before it, and statistics
brought in from PyTorch and Flax, each against the unfolded model or the source
framework's own inference output."""

import subprocess
import sys
import textwrap
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_norm

from ..helpers import assert_same, clone, leaves, stored

APPROACHES = list(eqx_norm.APPROACHES)
F64 = np.float64


def _cnn(key, approaches=("batch",) * 3, dtype=None, norm=None):
    """The issue's network: Conv -> BN -> relu -> grouped Conv without bias -> BN ->
    relu -> flatten -> Linear -> BN -> Linear, on (3, 6, 6) examples; the three
    BatchNorms use `approaches` in order."""
    chosen = iter(approaches)
    norm = norm or (
        lambda c: eqx_norm.BatchNorm(
            c, "batch", approach=next(chosen), momentum=0.5, dtype=dtype
        )
    )
    k = jax.random.split(key, 4)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(3, 8, 3, padding=1, key=k[0], dtype=dtype),
            norm(8),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Conv2d(
                8, 8, 3, padding=1, groups=2, use_bias=False, key=k[1], dtype=dtype
            ),
            norm(8),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(8 * 36, 16, key=k[2], dtype=dtype),
            norm(16),
            eqx.nn.Linear(16, 4, key=k[3], dtype=dtype),
        ]
    )


# Every approach in one of three models (three BatchNorms each).
_APPROACH_TRIPLES = [
    tuple(APPROACHES[(i + j) % len(APPROACHES)] for j in range(3))
    for i in range(0, len(APPROACHES), 3)
]


@eqx.filter_jit
def _run(model, state, x, inference):
    model = eqx.nn.inference_mode(model, inference)
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(
        x, state
    )


def _trained(model, state, key, shape, steps=3):
    """A few training-mode forward passes, so that the statistics are not the
    initial ones (and differ per channel)."""
    for k in jax.random.split(key, steps):
        x = 1.5 * jax.random.normal(k, shape, state_dtype(state)) + 0.7
        _, state = _run(model, state, x, inference=False)
    return state


def state_dtype(state):
    """The floating dtype of a state's statistics."""
    return next(
        a.dtype for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)
    )


def _assert_folds(model, state, x, rtol):
    expected, _ = _run(model, clone(state), x, inference=True)
    folded, folded_state = eqx_norm.fold(model, clone(state))
    got, _ = _run(folded, folded_state, x, inference=True)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)
    return folded, folded_state


@pytest.mark.slow  # three models per case; the default tier folds in the tests below
@pytest.mark.parametrize("approaches", _APPROACH_TRIPLES, ids="+".join)
def test_fold_keeps_the_inference_output(approaches, getkey):
    model, state = eqx.nn.make_with_state(_cnn)(getkey(), approaches)
    state = _trained(model, state, getkey(), (8, 3, 6, 6))
    x = jax.random.normal(getkey(), (5, 3, 6, 6))
    folded, folded_state = _assert_folds(model, state, x, rtol=1e-5)
    assert not [
        leaf
        for leaf in jax.tree.leaves(folded, is_leaf=lambda x: isinstance(x, eqx.Module))
        if type(leaf).__module__.startswith("eqx_norm")
    ]
    # Nothing stateful remains: the model runs without a state.
    assert not jax.tree.leaves(folded_state)
    y = jax.vmap(eqx.nn.inference_mode(folded))(x)
    np.testing.assert_allclose(
        y, _run(folded, folded_state, x, True)[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow  # float64 compiles of several models; float32 folds stay below
def test_fold_in_float64_is_exact(getkey):
    with jax.enable_x64(True):
        model, state = eqx.nn.make_with_state(_cnn)(
            getkey(), ("batch", "running", "renorm"), jnp.float64
        )
        state = _trained(model, state, getkey(), (8, 3, 6, 6))
        x = jax.random.normal(getkey(), (5, 3, 6, 6), jnp.float64)
        _assert_folds(model, state, x, rtol=1e-12)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_fold_equinox_batch_norm(mode, getkey):
    norm = lambda c: eqx.nn.BatchNorm(c, "batch", momentum=0.5, mode=mode)  # noqa: E731
    model, state = eqx.nn.make_with_state(_cnn)(getkey(), norm=norm)
    state = _trained(model, state, getkey(), (8, 3, 6, 6))
    x = jax.random.normal(getkey(), (5, 3, 6, 6))
    folded, _ = _assert_folds(model, state, x, rtol=1e-5)
    assert not any(
        isinstance(m, eqx.nn.BatchNorm)
        for m in jax.tree.leaves(folded, is_leaf=lambda x: isinstance(x, eqx.Module))
    )


def _variants_1d(key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv1d(3, 4, 3, padding=2, dilation=2, key=k1),
            eqx_norm.BatchNorm(4, "batch", momentum=0.5),
            eqx.nn.ConvTranspose1d(4, 6, 3, groups=2, use_bias=False, key=k2),
            eqx_norm.BatchNorm(6, "batch", momentum=0.5),
        ]
    )


def _variants_2d(key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.ConvTranspose2d(
                3, 4, 3, stride=2, padding=1, output_padding=1, key=k1
            ),
            eqx_norm.BatchNorm(4, "batch", momentum=0.5),
            eqx.nn.Conv2d(4, 6, 3, padding="SAME", groups=2, key=k2),
            eqx_norm.BatchNorm(6, "batch", momentum=0.5),
        ]
    )


def _variants_3d(key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv3d(3, 4, 2, stride=2, use_bias=False, key=k1),
            eqx_norm.BatchNorm(4, "batch", momentum=0.5),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(32, 5, use_bias=False, key=k2),
            eqx_norm.BatchNorm(5, "batch", momentum=0.5),
        ]
    )


@pytest.mark.slow  # a model per variant, each compiled twice
@pytest.mark.parametrize(
    "build, shape",
    [(_variants_1d, (3, 9)), (_variants_2d, (3, 4, 4)), (_variants_3d, (3, 4, 4, 4))],
    ids=[
        "conv1d-dilated+convT1d-groups-no-bias",
        "convT2d-strided+conv2d-same-groups",
        "conv3d-strided-no-bias+linear-no-bias",
    ],
)
def test_fold_layer_variants(build, shape, getkey):
    model, state = eqx.nn.make_with_state(build)(getkey())
    state = _trained(model, state, getkey(), (8, *shape))
    x = jax.random.normal(getkey(), (4, *shape))
    folded, _ = _assert_folds(model, state, x, rtol=1e-5)
    for before, after in zip(model.layers, folded.layers):
        if isinstance(before, eqx_norm.BatchNorm):
            assert isinstance(after, eqx.nn.Identity)
        else:
            assert type(after) is type(before)


def test_fold_nested_sequentials(getkey):
    k1, k2 = jax.random.split(getkey())

    def build():
        inner = eqx.nn.Sequential(
            [eqx.nn.Linear(4, 5, key=k1), eqx_norm.BatchNorm(5, "batch")]
        )
        return eqx.nn.Sequential(
            [
                inner,
                eqx.nn.Lambda(jnp.tanh),
                eqx.nn.Linear(5, 3, key=k2),
                eqx_norm.BatchNorm(3, "batch"),
            ]
        )

    model, state = eqx.nn.make_with_state(build)()
    state = _trained(model, state, getkey(), (8, 4))
    folded, _ = _assert_folds(model, state, jax.random.normal(getkey(), (4, 4)), 1e-5)
    assert isinstance(folded.layers[0].layers[1], eqx.nn.Identity)
    assert isinstance(folded.layers[3], eqx.nn.Identity)


def _after_activation(key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(4, 5, key=k1),
            eqx_norm.BatchNorm(5, "batch"),
            eqx.nn.Lambda(jnp.tanh),
            eqx_norm.BatchNorm(5, "batch"),
            eqx.nn.Linear(5, 2, key=k2),
        ]
    )


def test_batch_norm_after_an_activation_becomes_a_channel_affine(getkey):
    """It was left in place with a warning, so the served model still needed a
    state; now it becomes its inference-mode map, and the state is empty."""
    model, state = eqx.nn.make_with_state(_after_activation)(getkey())
    state = _trained(model, state, getkey(), (8, 4))
    x = jax.random.normal(getkey(), (4, 4))
    folded, folded_state = _assert_folds(model, state, x, rtol=1e-5)
    assert isinstance(folded.layers[1], eqx.nn.Identity)
    assert isinstance(folded.layers[3], eqx_norm.ChannelAffine)
    assert not jax.tree.leaves(folded_state)
    assert not eqx_norm.batch_norms(folded)
    # A Sequential with nothing stateful left runs without a state, in one jit.
    expected, _ = _run(model, clone(state), x, inference=True)
    np.testing.assert_allclose(jax.jit(jax.vmap(folded))(x), expected, rtol=1e-5)


def test_strict_fold_refuses_to_leave_a_batch_norm(getkey):
    model, state = eqx.nn.make_with_state(_after_activation)(getkey())
    before = leaves((model, state))
    with pytest.raises(
        ValueError,
        match=r"`fold\(strict=True\)`: 1 BatchNorm layer\(s\) cannot be folded.*"
        r"\.layers\[3\] \(it does not directly follow",
    ):
        eqx_norm.fold(model, state, strict=True)
    assert_same((model, state), before)


class _Block(eqx.Module):
    """A residual block written as the guide writes models: each BatchNorm called
    as `h, state = self.bn(h, state)`."""

    conv1: eqx.nn.Conv2d
    bn1: Any
    conv2: eqx.nn.Conv2d
    bn2: Any

    def __init__(self, c, key, norm):
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv2d(c, c, 3, padding=1, use_bias=False, key=k1)
        self.bn1 = norm(c)
        self.conv2 = eqx.nn.Conv2d(c, c, 3, padding=1, use_bias=False, key=k2)
        self.bn2 = norm(c)

    def __call__(self, x, state):
        h, state = self.bn1(self.conv1(x), state)
        h, state = self.bn2(self.conv2(jax.nn.relu(h)), state)
        return jax.nn.relu(h + x), state


class _ResNet(eqx.Module):
    stem: eqx.nn.Sequential
    blocks: list
    head: eqx.nn.Linear

    def __init__(self, key, norm=lambda c: eqx_norm.BatchNorm(c, "batch")):
        k = jax.random.split(key, 4)
        self.stem = eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(1, 4, 3, padding=1, key=k[0]),
                norm(4),
                eqx.nn.Lambda(jax.nn.relu),
            ]
        )
        self.blocks = [_Block(4, k[1], norm), _Block(4, k[2], norm)]
        self.head = eqx.nn.Linear(4, 3, key=k[3])

    def __call__(self, x, state):
        h, state = self.stem(x, state)
        for block in self.blocks:
            h, state = block(h, state)
        return self.head(jnp.mean(h, axis=(1, 2))), state


@pytest.mark.parametrize(
    "norm",
    [
        lambda c: eqx_norm.BatchNorm(c, "batch", approach="renorm", momentum=0.5),
        lambda c: eqx.nn.BatchNorm(c, "batch", mode="batch", momentum=0.5),
    ],
    ids=["eqx_norm", "equinox"],
)
def test_fold_serves_a_model_with_custom_blocks(norm, getkey):
    """Regression: a block that calls `h, state = self.bn1(h, state)` was left
    unfolded with a warning pointing to `fold_into`, and putting `eqx.nn.Identity`
    where the BatchNorm was (what the warning said) failed with "takes 2 positional
    arguments but 3 were given". Now the stem folds into its convolution and each
    block's BatchNorms become their inference-mode maps: no BatchNorm is left, no
    state is needed, and the served model computes what inference computes."""
    model, state = eqx.nn.make_with_state(_ResNet)(getkey(), norm)
    state = _trained(model, state, getkey(), (8, 1, 6, 6))
    x = jax.random.normal(getkey(), (5, 1, 6, 6))
    expected, _ = _run(model, clone(state), x, inference=True)
    served, served_state = eqx_norm.fold(model, clone(state))
    served = cast(Any, served)
    is_norm = lambda m: isinstance(m, (eqx_norm.BatchNorm, eqx.nn.BatchNorm))  # noqa
    assert not [m for m in jax.tree.leaves(served, is_leaf=is_norm) if is_norm(m)]
    assert isinstance(served.stem.layers[1], eqx.nn.Identity)  # folded into the conv
    assert isinstance(served.blocks[0].bn1, eqx_norm.ChannelAffine)
    assert not jax.tree.leaves(served_state)
    got, _ = jax.jit(jax.vmap(served, in_axes=(0, None), out_axes=(0, None)))(
        x, served_state
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The map computes exactly what the BatchNorm's own inference computes.
    if isinstance(model.blocks[0].bn1, eqx_norm.BatchNorm):
        h = jax.random.normal(getkey(), (4, 6, 6))
        bn = eqx.nn.inference_mode(model.blocks[0].bn1)
        np.testing.assert_array_equal(
            served.blocks[0].bn1(h, served_state)[0], bn(h, clone(state))[0]
        )
        np.testing.assert_array_equal(served.blocks[0].bn1(h), bn(h, state)[0])


def test_channel_affine_on_a_channels_last_batch_norm(getkey):
    """A `channel_axis=-1` BatchNorm (which cannot fold into the Conv before it)
    becomes a map over the same axis."""
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Conv1d(3, 5, 3, key=getkey()),
            eqx_norm.BatchNorm(4, "batch", channel_axis=-1, momentum=0.5),
        ]
    )
    state = _trained(model, state, getkey(), (8, 3, 6))
    x = jax.random.normal(getkey(), (3, 3, 6))
    folded, _ = _assert_folds(model, state, x, rtol=1e-6)
    assert folded.layers[1].channel_axis == -1


@pytest.mark.slow  # a subprocess
def test_folded_model_serialises_and_runs_without_eqx_norm(getkey, tmp_path):
    model, state = eqx.nn.make_with_state(_cnn)(getkey())
    state = _trained(model, state, getkey(), (8, 3, 6, 6))
    folded, _ = eqx_norm.fold(model, state)
    path = tmp_path / "folded.eqx"
    eqx.tree_serialise_leaves(path, folded)
    x = np.asarray(jax.random.normal(getkey(), (2, 3, 6, 6)))
    np.save(tmp_path / "x.npy", x)
    expected = np.asarray(jax.vmap(folded)(jnp.asarray(x)))
    # The same skeleton, built without eqx_norm (which cannot be imported there).
    script = textwrap.dedent(
        """
        import sys
        sys.modules["eqx_norm"] = None  # any import of eqx_norm fails
        import equinox as eqx, jax, jax.numpy as jnp, numpy as np

        k = jax.random.split(jax.random.key(0), 4)
        skeleton = eqx.nn.Sequential([
            eqx.nn.Conv2d(3, 8, 3, padding=1, key=k[0]),
            eqx.nn.Identity(),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Conv2d(8, 8, 3, padding=1, groups=2, key=k[1]),
            eqx.nn.Identity(),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(8 * 36, 16, key=k[2]),
            eqx.nn.Identity(),
            eqx.nn.Linear(16, 4, key=k[3]),
        ])
        model = eqx.tree_deserialise_leaves(sys.argv[1], skeleton)
        y = jax.vmap(model)(jnp.asarray(np.load(sys.argv[2])))
        np.save(sys.argv[3], np.asarray(y))
        """
    )
    out = tmp_path / "y.npy"
    subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-6, atol=1e-6)
    # And in this process, a round trip of the leaves.
    again = eqx.tree_deserialise_leaves(path, folded)
    np.testing.assert_array_equal(jax.vmap(again)(jnp.asarray(x)), expected)


# ------------------------------------------------------------------ fold_into errors


def _bn(c, **kwargs):
    return eqx.nn.make_with_state(eqx_norm.BatchNorm)(c, "batch", **kwargs)


@pytest.mark.parametrize(
    "layer, bn_args, error, message",
    [
        (
            lambda k: eqx.nn.Linear(3, 4, key=k),
            (5, {}),
            ValueError,
            r"normalises 5 channels, but the Linear before it has 4 output channels",
        ),
        (
            lambda k: eqx.nn.Conv2d(3, 4, 3, key=k),
            (4, {"channel_axis": -1}),
            ValueError,
            r"`channel_axis=-1` is not the Conv2d's output channels",
        ),
        (
            lambda k: eqx.nn.LayerNorm(4),
            (4, {}),
            TypeError,
            r"folds into an `eqx.nn.Linear`.*got a LayerNorm before the BatchNorm "
            r"`eqx_norm\.BatchNorm\(input_size=4",
        ),
        (
            lambda k: eqx.nn.Linear(3, "scalar", key=k),
            (1, {}),
            ValueError,
            r"normalises 1 channels, but the Linear before it has None",
        ),
    ],
    ids=["channels", "channel-axis", "layer-type", "scalar-linear"],
)
def test_fold_into_errors_name_both_layers(layer, bn_args, error, message, getkey):
    bn, state = _bn(bn_args[0], **bn_args[1])
    with pytest.raises(error, match=message):
        eqx_norm.fold_into(layer(getkey()), bn, state)


def test_fold_into_refuses_a_non_batch_norm(getkey):
    layer = eqx.nn.Linear(3, 4, key=getkey())
    with pytest.raises(TypeError, match=r"got a Linear after the Linear"):
        eqx_norm.fold_into(layer, layer, eqx.nn.State(layer))


def _assert_fold_into_refuses(layer, bn, state, message):
    """`fold_into(layer, bn, state)` raises a `ValueError` matching `message`, and
    changes none of its arguments."""
    before = leaves((layer, bn, state))
    with pytest.raises(ValueError, match=message):
        eqx_norm.fold_into(layer, bn, state)
    assert_same((layer, bn, state), before)


_OUT_OF_RANGE = [
    (lambda k: eqx.nn.Conv2d(3, 4, 3, key=k), 3, "Conv2d", "3-D"),
    (lambda k: eqx.nn.Conv2d(3, 4, 3, key=k), -6, "Conv2d", "3-D"),
    (lambda k: eqx.nn.Linear(3, 4, key=k), 1, "Linear", "1-D"),
]


@pytest.mark.parametrize(
    "layer, axis, name, rank", _OUT_OF_RANGE, ids=["conv-3", "conv--6", "linear-1"]
)
def test_fold_into_refuses_a_channel_axis_out_of_range(layer, axis, name, rank, getkey):
    """It reduced the axis modulo the rank, so an output the BatchNorm itself refuses
    folded as if the channels were on axis 0."""
    layer = layer(getkey())
    bn, state = _bn(4, channel_axis=axis)
    message = (
        rf"BatchNorm `eqx_norm\.BatchNorm\(input_size=4, channel_axis={axis}\)` "
        rf"has `channel_axis={axis}`, out of range for the {rank} output of the "
        rf"{name}"
    )
    _assert_fold_into_refuses(layer, bn, state, message)
    # `fold(strict=True)` names such a layer and says why.
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [layer, eqx_norm.BatchNorm(4, "batch", channel_axis=axis)]
    )
    with pytest.raises(ValueError, match=rf"\.layers\[1\] \(the BatchNorm .*{name}"):
        eqx_norm.fold(model, state, strict=True)
    folded, _ = eqx_norm.fold(model, state)
    assert isinstance(folded.layers[1], eqx_norm.ChannelAffine)


def test_fold_maps_a_batch_norm_over_another_axis(getkey):
    """A BatchNorm over the width of a Conv2d's output (here as wide as the channels)
    is a working model that cannot be folded into the convolution: it becomes its
    inference-mode map over that axis, and `strict=True` names it with the reason.
    A BatchNorm of another channel count is named too (it raised before)."""

    def build(key):
        k1, k2 = jax.random.split(key)
        return eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1),
                eqx_norm.BatchNorm(4, "batch", channel_axis=-1),
                eqx.nn.Lambda(jnp.ravel),
                eqx.nn.Linear(80, 6, key=k2),
                eqx_norm.BatchNorm(5, "batch"),
            ]
        )

    model, state = eqx.nn.make_with_state(build)(getkey())
    x = jax.random.normal(getkey(), (2, 3, 5, 4))
    with pytest.raises(
        ValueError,
        match=r"2 BatchNorm.*\.layers\[1\] \(the BatchNorm's `channel_axis=-1` "
        r"is not the Conv2d's output channels.*\.layers\[4\] \(the BatchNorm "
        r"normalises 5 channels, but the Linear before it has 6",
    ):
        eqx_norm.fold(model, state, strict=True)
    folded, folded_state = eqx_norm.fold(model, state)
    assert isinstance(folded.layers[1], eqx_norm.ChannelAffine)
    assert isinstance(folded.layers[4], eqx_norm.ChannelAffine)
    inference = eqx.nn.inference_mode(eqx.nn.Sequential(model.layers[:4]))
    expected, _ = jax.vmap(inference, (0, None), (0, None), axis_name="batch")(x, state)
    got = jax.vmap(eqx.nn.Sequential(folded.layers[:4]))(x)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def _reference_fold(layer, mean, var, eps, weight=None, bias=None):
    """The folded weight and bias, in float64 NumPy."""
    w = np.asarray(layer.weight, np.float64)
    b = np.zeros(w.shape[0]) if layer.bias is None else np.asarray(layer.bias, F64)
    scale = 1 / np.sqrt(np.asarray(var, F64) + eps)
    if weight is not None:
        scale = scale * np.asarray(weight, F64)
    shift = -np.asarray(mean, F64) * scale + (0 if bias is None else bias)
    return w * scale.reshape((-1,) + (1,) * (w.ndim - 1)), b.reshape(-1) * scale + shift


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_fold_of_a_never_trained_equinox_batch_norm_keeps_its_output(mode, getkey):
    """Equinox's ema mode normalises with its zero buffers before any training step
    (variance 0, a scale of 1/sqrt(eps)); fold substituted variance 1 and changed
    the output 300-fold."""
    linear = eqx.nn.Linear(3, 4, key=getkey())
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [linear, eqx.nn.BatchNorm(4, "batch", mode=mode)]
    )
    x = jax.random.normal(getkey(), (5, 3))
    expected, _ = jax.vmap(
        eqx.nn.inference_mode(model), (0, None), (0, None), axis_name="batch"
    )(x, state)
    folded, _ = eqx_norm.fold(model, state)
    var = np.zeros(4) if mode == "ema" else np.ones(4)
    w, b = _reference_fold(linear, np.zeros(4), var, 1e-5)
    np.testing.assert_allclose(folded.layers[0].weight, w, rtol=1e-6)
    np.testing.assert_allclose(folded.layers[0].bias, b, rtol=1e-6)
    got = jax.vmap(folded)(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, np.asarray(x, F64) @ w.T + b, rtol=1e-5)


def _zero_variance(eps=0.0):
    bn, state = _bn(4, eps=eps)
    return bn, bn.set_statistics(state, np.ones(4), np.array([1.0, 0.0, 2.0, 0.5]))


def test_fold_into_refuses_a_zero_variance_with_eps_zero(getkey):
    """With `eps=0` and a zero variance it returned infinite weights."""
    layer = eqx.nn.Linear(3, 4, key=getkey())
    bn, state = _zero_variance()
    message = (
        r"`fold_into`: channel 1 of the BatchNorm .* non-finite scale or shift: "
        r"mean 1\.0, variance 0\.0, `eps=0\.0`.*give the BatchNorm a positive `eps`"
    )
    _assert_fold_into_refuses(layer, bn, state, message)
    # The same layer in a model: `fold` names its path.
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [layer, eqx_norm.BatchNorm(4, "batch", eps=0.0)]
    )
    state = model.layers[1].set_statistics(state, np.ones(4), np.array([1, 0, 2, 0.5]))
    with pytest.raises(ValueError, match=r"`fold`: the BatchNorm at '\.layers\[1\]'"):
        eqx_norm.fold(model, state)


def test_fold_into_under_jit_does_not_check_a_zero_variance(getkey):
    """Traced statistics are not checked (as documented): the channel with
    `var + eps = 0` gets infinite weights, as its unfolded output is infinite; the
    others fold as they do eagerly."""
    layer = eqx.nn.Linear(3, 4, key=getkey())
    bn, state = _zero_variance()
    folded = eqx.filter_jit(eqx_norm.fold_into)(layer, bn, state)
    assert np.all(np.isinf(folded.weight[1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        w, _ = _reference_fold(layer, np.ones(4), [1.0, 0.0, 2.0, 0.5], 0.0, bn.weight)
    keep = np.array([0, 2, 3])
    np.testing.assert_allclose(folded.weight[keep], w[keep], rtol=1e-6)


def _set_raw(bn, state, **fields):
    """The state with this layer's stored statistics replaced as they are (past
    `set_statistics`' checks, as a corrupted state would have them)."""
    return state.set(bn.state_index, stored(state, bn.state_index)._replace(**fields))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda bn, s: (bn, _set_raw(bn, s, mean=jnp.array([0.0, 0, jnp.nan, 0]))),
            r"channel 2 .*mean nan, variance 1\.0.*Repair the statistics",
        ),
        (
            lambda bn, s: (bn, _set_raw(bn, s, var=jnp.array([1.0, 1, -2, 1]))),
            r"channel 2 .*variance -2\.0, `eps=1e-05`.*Repair the statistics",
        ),
        (
            lambda bn, s: (bn, _set_raw(bn, s, var=jnp.array([1.0, 1, jnp.nan, 1]))),
            r"channel 2 .*variance nan",
        ),
        (
            lambda bn, s: (
                eqx.tree_at(lambda b: b.weight, bn, jnp.array([1.0, 1, jnp.inf, 1])),
                s,
            ),
            r"channel 2 .*weight inf, bias 0\.0",
        ),
    ],
    ids=["nan-mean", "negative-var", "nan-var", "inf-weight"],
)
def test_fold_into_refuses_non_finite_statistics(corrupt, message, getkey):
    layer = eqx.nn.Linear(3, 4, key=getkey())
    bn, state = corrupt(*_bn(4))
    _assert_fold_into_refuses(layer, bn, state, message)


def test_fold_into_refuses_to_overflow_a_float16_layer(getkey):
    """A tiny variance with `eps=0` scales float16 weights past 65504: infinite
    weights, silently, where the unfolded layer stays finite."""
    layer = eqx.nn.Linear(3, 4, key=getkey(), dtype=jnp.float16)
    bn, state = _bn(4, eps=0.0)
    state = bn.set_statistics(state, np.zeros(4), np.array([1.0, 1.0, 1.0, 1e-12]))
    with pytest.raises(
        ValueError, match=r"overflows its float16 weight in output channel 3"
    ):
        eqx_norm.fold_into(layer, bn, state)


_STATISTICS = {
    "numpy-int64": (lambda a: np.round(4 * a).astype(np.int64), 1e-5),
    "numpy-float64": (lambda a: a, 1e-5),
    "numpy-float16": (lambda a: a.astype(np.float16), np.float32(1e-3)),
    "jax-float32": (lambda a: jnp.asarray(a, jnp.float32), jnp.float32(1e-3)),
    "jax-float16": (lambda a: jnp.asarray(a, jnp.float16), np.float64(0.0)),
}


@pytest.mark.parametrize("layer_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind", list(_STATISTICS))
def test_set_statistics_round_trip_through_fold(kind, layer_dtype, getkey):
    """Statistics given as NumPy or JAX arrays of integer or float dtypes, and `eps`
    as a NumPy or JAX scalar, fold to the float64 reference, in the layer's dtype;
    a float16 or bfloat16 layer folded under strict dtype promotion raised a
    `TypePromotionError`."""
    convert, eps = _STATISTICS[kind]
    mean = np.array([0.5, -1.0, 2.0, 0.0])
    var = np.array([0.25, 4.0, 1.0, 2.0])
    bn, state = _bn(4, eps=eps)
    bn = eqx.tree_at(
        lambda b: (b.weight, b.bias),
        bn,
        (jnp.array([1.0, 0.5, -2.0, 0.0]), jnp.array([0.0, 1.0, -1.0, 3.0])),
    )
    state = bn.set_statistics(state, convert(mean), convert(var), counter=np.int64(3))
    # What the layer stores (rounded to float16 or bfloat16 where given so).
    stored_mean, stored_var = (np.asarray(a, F64) for a in bn.statistics(state))
    np.testing.assert_allclose(stored_mean, np.asarray(convert(mean), F64))
    layer = eqx.nn.Conv1d(3, 4, 2, key=getkey(), dtype=layer_dtype)
    folded = eqx_norm.fold_into(layer, bn, state)
    assert folded.weight.dtype == layer_dtype and folded.bias.dtype == layer_dtype
    w, b = _reference_fold(
        layer, stored_mean, stored_var, float(eps), bn.weight, np.asarray(bn.bias)
    )
    tol = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2, jnp.float16: 1e-3}[layer_dtype]
    np.testing.assert_allclose(np.asarray(folded.weight, F64), w, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        np.asarray(folded.bias, F64).ravel(), b, rtol=tol, atol=tol
    )


@pytest.mark.parametrize("norm", ["eqx_norm", "equinox"])
def test_fold_into_without_channelwise_affine(norm, getkey):
    layer = eqx.nn.Linear("scalar", 4, key=getkey())
    if norm == "eqx_norm":
        bn, state = _bn(4, channelwise_affine=False)
        state = bn.set_statistics(state, np.arange(4.0), np.arange(1.0, 5.0))
        mean, var = np.arange(4.0), np.arange(1.0, 5.0)
    else:
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            4, "batch", channelwise_affine=False, mode="batch"
        )
        mean, var = np.zeros(4), np.ones(4)
    folded = eqx_norm.fold_into(layer, bn, state)
    w, b = _reference_fold(layer, mean, var, 1e-5)
    np.testing.assert_allclose(folded.weight, w, rtol=1e-6)
    np.testing.assert_allclose(folded.bias, b, rtol=1e-6, atol=1e-7)


def test_fold_into_with_the_state_of_another_model(getkey):
    """Equinox's bare `KeyError: 'BatchNorm.state_index'` before."""
    layer = eqx.nn.Linear(3, 4, key=getkey())
    bn, _ = _bn(4)
    _, other_state = _bn(4)
    _, equinox_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "b", mode="batch")
    with pytest.raises(ValueError, match=r"the state does not hold the statistics"):
        eqx_norm.fold_into(layer, bn, equinox_state)
    # Another layer's state of the same structure is indistinguishable by design
    # (same path): it folds with those statistics.
    eqx_norm.fold_into(layer, bn, other_state)


def test_fold_without_a_batch_norm_or_with_only_one(getkey):
    """A model without BatchNorm comes back as it was, with no warning; a bare
    BatchNorm (no layer before it) becomes its map, and `strict=True` names it as
    the model itself, not as `''`."""
    model = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=getkey())])
    folded, folded_state = eqx_norm.fold(
        model, eqx.nn.make_with_state(eqx.nn.Identity)()[1]
    )
    assert eqx.tree_equal(folded, model)
    assert not jax.tree.leaves(folded_state)
    bn, state = _bn(4)
    folded, _ = eqx_norm.fold(bn, state)
    assert isinstance(folded, eqx_norm.ChannelAffine)
    with pytest.raises(ValueError, match=r"\['\(the model itself\) \(in a module"):
        eqx_norm.fold(bn, state, strict=True)


def test_fold_under_jit_equals_fold(getkey):
    model, state = eqx.nn.make_with_state(_variants_3d)(getkey())
    state = _trained(model, state, getkey(), (8, 3, 4, 4, 4))
    eager, _ = eqx_norm.fold(model, clone(state))
    jitted, _ = eqx.filter_jit(eqx_norm.fold)(model, clone(state))
    arrays = eqx.filter((eager, jitted), eqx.is_array)
    for a, b in zip(*(jax.tree.leaves(t) for t in arrays), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ set_statistics


@pytest.mark.parametrize(
    "mean, var, message",
    [
        (np.zeros(4), np.ones(3), r"`mean` has shape \(4,\).*3 channels"),
        (np.zeros(3), np.ones((3, 1)), r"`var` has shape \(3, 1\)"),
        (np.array([0.0, np.nan, 0.0]), np.ones(3), "`mean` is not finite"),
        (np.zeros(3), np.array([1.0, np.inf, 1.0]), "`var` is not finite"),
        (np.zeros(3), np.array([1.0, -0.1, 1.0]), "`var` has a negative value"),
    ],
    ids=["mean-shape", "var-shape", "nan-mean", "inf-var", "negative-var"],
)
def test_set_statistics_errors(mean, var, message):
    bn, state = _bn(3)
    with pytest.raises(ValueError, match=message):
        bn.set_statistics(state, mean, var)


@pytest.mark.parametrize(
    "counter, error", [(-1, ValueError), (2**31, ValueError), (1.5, TypeError)]
)
def test_set_statistics_refuses_a_bad_counter(counter, error):
    bn, state = _bn(3)
    with pytest.raises(error, match="counter"):
        bn.set_statistics(state, np.zeros(3), np.ones(3), counter=counter)


@pytest.mark.parametrize("approach", APPROACHES)
def test_set_statistics_sets_the_inference_statistics(approach):
    bn, state = _bn(3, approach=approach)
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([0.25, 4.0, 1.0])
    state = bn.set_statistics(state, mean, var, counter=7)
    np.testing.assert_allclose(bn.statistics(state), (mean, var), rtol=1e-7)
    assert int(stored(state, bn.state_index).counter) == 7


# --------------------------------------------------------- from PyTorch and Flax


def test_import_from_pytorch_matches_its_eval_output():
    torch = pytest.importorskip(
        "torch", reason="PyTorch (CPU) is a dev dependency; not installable here"
    )
    torch.manual_seed(0)
    source = torch.nn.BatchNorm2d(4, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        source.weight.uniform_(0.5, 1.5)
        source.bias.uniform_(-0.5, 0.5)
    source.train()
    for _ in range(5):
        source(torch.randn(8, 4, 5, 5) * 2 + 1)
    source.eval()
    x = torch.randn(6, 4, 5, 5) * 2 + 1
    expected = source(x).detach().numpy()

    sd = {k: v.numpy() for k, v in source.state_dict().items()}
    bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(
        4, "batch", momentum=1 - source.momentum, eps=source.eps
    )
    bn = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        bn,
        (jnp.asarray(sd["weight"]), jnp.asarray(sd["bias"])),
    )
    state = bn.set_statistics(
        state,
        sd["running_mean"],
        sd["running_var"],
        counter=int(sd["num_batches_tracked"]),
    )
    y, _ = jax.vmap(lambda xi: bn(xi, state, inference=True), axis_name="batch")(
        jnp.asarray(x.numpy())
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_import_from_flax_matches_its_inference_output():
    nn = pytest.importorskip("flax.linen", reason="Flax is a dev dependency")
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, axis=-1)
    x0 = jax.random.normal(jax.random.key(0), (8, 5, 4)) * 2 + 1
    variables = flax_bn.init(jax.random.key(1), x0, use_running_average=False)
    params = {
        "scale": jax.random.uniform(jax.random.key(2), (4,)) + 0.5,
        "bias": jax.random.normal(jax.random.key(3), (4,)),
    }
    stats = variables["batch_stats"]
    for i in range(5):
        xi = jax.random.normal(jax.random.key(10 + i), (8, 5, 4)) * 2 + 1
        _, updates = flax_bn.apply(
            {"params": params, "batch_stats": stats},
            xi,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        stats = updates["batch_stats"]
    x = jax.random.normal(jax.random.key(4), (6, 5, 4)) * 2 + 1
    expected = flax_bn.apply(
        {"params": params, "batch_stats": stats}, x, use_running_average=True
    )

    bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(
        4, "batch", momentum=0.9, eps=1e-5, channel_axis=-1
    )
    bn = eqx.tree_at(
        lambda m: (m.weight, m.bias), bn, (params["scale"], params["bias"])
    )
    state = bn.set_statistics(state, stats["mean"], stats["var"], counter=5)
    y, _ = jax.vmap(lambda xi: bn(xi, state, inference=True), axis_name="batch")(x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
