"""Serving and porting: folding BatchNorm into the layer before it, and statistics
brought in from PyTorch and Flax, each against the unfolded model or the source
framework's own inference output."""

import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_norm

from .helpers import clone

APPROACHES = list(eqx_norm.APPROACHES)


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


def test_batch_norm_after_an_activation_is_left_and_reported(getkey):
    model, state = eqx.nn.make_with_state(_after_activation)(getkey())
    state = _trained(model, state, getkey(), (8, 4))
    x = jax.random.normal(getkey(), (4, 4))
    with pytest.warns(UserWarning, match=r"left 1 BatchNorm.*\.layers\[3\]"):
        folded, folded_state = _assert_folds(model, state, x, rtol=1e-5)
    assert isinstance(folded.layers[1], eqx.nn.Identity)
    assert isinstance(folded.layers[3], eqx_norm.BatchNorm)
    # The state keeps the remaining layer's statistics, and only those.
    assert len(jax.tree.leaves(folded_state)) == 3
    np.testing.assert_array_equal(
        folded.layers[3].statistics(folded_state)[0],
        model.layers[3].statistics(state)[0],
    )


def test_strict_fold_refuses_to_leave_a_batch_norm(getkey):
    model, state = eqx.nn.make_with_state(_after_activation)(getkey())
    with pytest.raises(ValueError, match=r"left 1 BatchNorm.*\.layers\[3\]"):
        eqx_norm.fold(model, state, strict=True)


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
            r"folds into an `eqx.nn.Linear`.*got a LayerNorm",
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
    assert int(state.get(bn.state_index).counter) == 7


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
