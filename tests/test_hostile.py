"""Hostile and unlucky input: each case gets a clear error whose message is matched,
or a defined safe result, and nothing is corrupted or half-written.

The first block pins the defects found so far, one regression test each, named
after the defect; the tables after it are the wider suite.
"""

import gzip
import json
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_norm
from eqx_norm import data

from .helpers import MLP, apply, batches, bn_at, make, mse_loss

F64 = np.float64


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _assert_same(tree, before):
    for a, b in zip(_leaves(tree), before, strict=True):
        np.testing.assert_array_equal(a, b)


def _trained_mlp(approach: str | eqx_norm.Approach = "batch", steps=3):
    model, state = eqx.nn.make_with_state(MLP)(approach)
    for k in jax.random.split(jax.random.key(1), steps):
        _, state = apply(model, 3 + 2 * jax.random.normal(k, (16, 4)), state)
    return model, state


# ------------------------------------------------------------ the defects found


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    """Defect 1: a save that fails part-way (here: a file-size limit smaller than
    the checkpoint, as a disk filling up) left a truncated file in place of the
    good one. Now the previous file is intact and no temporary file remains."""
    script = textwrap.dedent(
        """
        import os, resource, signal, sys
        import equinox as eqx, jax
        import eqx_norm
        from tests.helpers import MLP

        path = sys.argv[1]
        model, state = eqx.nn.make_with_state(MLP)()
        eqx_norm.save(path, model, state)
        size = os.path.getsize(path)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))
        other, other_state = eqx.nn.make_with_state(MLP)(key=jax.random.key(7))
        try:
            eqx_norm.save(path, other, other_state)
        except OSError as e:
            print("save failed:", e.errno)
        """
    )
    path = tmp_path / "model.eqx"
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent),
        timeout=120,
    )
    assert "save failed" in out.stdout, out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["model.eqx"]
    model, state = eqx.nn.make_with_state(MLP)()
    like = eqx.nn.make_with_state(MLP)(key=jax.random.key(3))
    loaded = eqx_norm.load(path, *like)
    _assert_same(loaded, _leaves((model, state)))


@pytest.mark.parametrize(
    "approach", ["batch", "adam-correction", "smooth-start", "renorm"]
)
@pytest.mark.parametrize("momentum", [0.99, 0.999])
def test_constant_first_batch_channel_stores_zero_variance(approach, momentum):
    """Defect 2: the first step's debiasing weight was 1.0000129 (momentum 0.999)
    in float32, so a channel that is constant in the first batch (a dead ReLU, a
    zero-padded channel) was stored with variance -1.3e-5 and inference gave NaN.
    Now the first step stores the batch statistics exactly."""
    bn, state = make(3, approach=approach, momentum=momentum)
    x = jax.random.normal(jax.random.key(0), (8, 3)) * jnp.array([0.0, 1.0, 3.0]) + 2
    _, state = apply(bn, x, state)
    mean, var = bn.statistics(state)
    assert float(var[0]) == 0.0
    xs = np.asarray(x, F64)
    expected_var = xs.var(0, ddof=1 if approach in ("batch", "renorm") else 0)
    np.testing.assert_allclose(mean, xs.mean(0), rtol=2e-7)
    np.testing.assert_allclose(var, expected_var, rtol=4e-6)  # float32 moments
    y, _ = apply(bn, x, state, inference=True)
    assert np.all(np.isfinite(y))


def test_momentum_that_rounds_to_one_is_refused():
    """Defect 3a: momentum 1 - 1e-9 passed the [0, 1) check but is 1.0 in float32,
    and the first update divided by zero."""
    with pytest.raises(ValueError, match="rounds to 1 in the statistics' dtype"):
        eqx_norm.BatchNorm(3, "batch", momentum=1 - 1e-9)


def test_non_finite_new_running_statistics_are_refused():
    """Defect 3b: the guard checked the batch statistics only; a strategy whose new
    running statistics overflow (or go negative) must leave the state unchanged."""

    class Overflowing(eqx_norm.Approach):
        def train(self, batch, running, momentum, eps):
            new = eqx_norm.RunningStats(
                running.mean + 1e38 * batch.mean * 1e38, -batch.var, running.counter + 1
            )
            return batch.mean, batch.var, new

    bn, state = make(3, approach=Overflowing())
    before = _leaves(state)
    x = 1 + jax.random.normal(jax.random.key(0), (8, 3))
    y, after = apply(bn, x, state)
    _assert_same(after, before)
    assert np.all(np.isfinite(y))


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
    """Defect 4: NaN rho turned every parameter into NaN; a NumPy negative rho
    skipped the check and SAM climbed."""
    name = "eta" if "eta" in kwargs else "rho"
    with pytest.raises(ValueError, match=f"`{name}` must be finite and at least 0"):
        eqx_norm.sam(optax.sgd(0.1), **kwargs)


def test_running_does_not_overflow_at_large_variance():
    """Defect 5a: `c * var + n * var` overflowed float32 for data of standard
    deviation 1.2e18 once the count reached its cap."""
    bn, state = make(3, approach="running")
    x = 1.2e18 * jax.random.normal(jax.random.key(0), (64, 3))
    y = x
    for _ in range(6):
        y, state = apply(bn, x, state)
    mean, var = bn.statistics(state)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
    np.testing.assert_allclose(var, np.asarray(x, F64).var(0), rtol=1e-5)
    assert np.all(np.isfinite(y))


def test_running_counter_saturates_instead_of_wrapping():
    """Defect 5b: with max_count 2**31 - 1 the int32 counter wrapped negative."""
    top = 2**31 - 1
    bn, state = make(3, approach=eqx_norm.Running(max_count=top))
    stats = state.get(bn.state_index)
    state = state.set(bn.state_index, stats._replace(counter=jnp.int32(top - 10)))
    x = 5 + jax.random.normal(jax.random.key(0), (64, 3))
    for _ in range(2):
        _, state = apply(bn, x, state)
        assert int(state.get(bn.state_index).counter) == top


@pytest.mark.parametrize(
    "max_count, error",
    [
        (2**40, ValueError),
        (2**31, ValueError),
        (0, ValueError),
        (-5, ValueError),
        (2.5, TypeError),
        (True, TypeError),
        ("256", TypeError),
    ],
)
def test_running_max_count_is_validated_at_construction(max_count, error):
    """Defect 5c: max_count=2**40 was accepted, then the first call raised an
    OverflowError that did not name it."""
    with pytest.raises(error, match="max_count"):
        eqx_norm.Running(max_count=max_count)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32, jnp.bool_])
@pytest.mark.parametrize("inference", [False, True])
def test_integer_input_is_a_type_error(dtype, inference):
    """Defect 6: a uint8 batch came back as uint8 garbage."""
    bn, state = make(3)
    with pytest.raises(TypeError, match=f"dtype {jnp.dtype(dtype)}.*Cast it first"):
        apply(bn, jnp.ones((4, 3), dtype), state, inference=inference)


@pytest.mark.parametrize("inference", [False, True])
def test_state_of_another_layer_is_refused(inference):
    """Defect 7: a 6-channel layer given a 1-channel layer's state normalised all
    six channels with its statistics."""
    _, state1 = make(1)
    bn6, _ = make(6)
    with pytest.raises(ValueError, match=r"input_size=6.*shape \(1,\), not \(6,\)"):
        apply(bn6, jnp.ones((4, 6)), state1, inference=inference)
    with pytest.raises(ValueError, match=r"input_size=6.*shape \(1,\)"):
        bn6.statistics(state1)


def _sam_step_setup():
    model, state = eqx.nn.make_with_state(MLP)()
    opt = eqx_norm.sam(optax.sgd(0.1))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    x = jax.random.normal(jax.random.key(0), (8, 4))
    y = jax.random.normal(jax.random.key(1), (8, 2))
    return model, state, opt, opt_state, x, y


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
    """Defect 8: `(loss, (aux, state))` made the step return the logits as the new
    state; a bare scalar loss gave 'iteration over a 0-d array'."""
    model, state, opt, opt_state, x, y = _sam_step_setup()
    step = eqx_norm.sam_step(loss_fn, opt, has_aux=has_aux)
    with pytest.raises(TypeError, match=f"`loss_fn` must return.*{message}"):
        eqx.filter_jit(step)(model, state, opt_state, x, y)


def _header_variants():
    good = {
        "path": ".layers.layers[1]",
        "approach": "Batch()",
        "input_size": 6,
        "statistics_dtype": "float32",
        "parameter_dtype": "float32",
    }

    def header(**changes):
        h = {"format": "eqx_norm-checkpoint", "version": 2, "layers": [good]}
        h.update(changes)
        return json.dumps(h).encode()

    no_key = {k: v for k, v in good.items() if k != "approach"}
    return {
        "no-layers": (header(layers=None), "`layers` is missing"),
        "layers-int": (header(layers=5), "`layers` is missing or not a list"),
        "entry-without-keys": (header(layers=[no_key]), "no valid 'approach'"),
        "entry-not-object": (header(layers=[3]), "entry 0 .* not an object"),
        "size-a-string": (
            header(layers=[{**good, "input_size": "6"}]),
            "no valid 'input_size'",
        ),
        "size-a-bool": (
            header(layers=[{**good, "input_size": True}]),
            "no valid 'input_size'",
        ),
        "version-99": (header(version=99), "format version 99"),
        "no-version": (header(version=None), "format version None"),
        "wrong-format": (header(format="other"), "does not say format"),
        "not-json": (b"{not json", "not a JSON header"),
        "json-list": (b"[1, 2]", "does not say format"),
        "empty-file": (b"", "not a JSON header"),
        "duplicate-layer": (header(layers=[good, good]), "lists a layer twice"),
    }


@pytest.mark.parametrize("case", list(_header_variants()))
def test_load_names_a_malformed_header_and_checks_the_version(case, tmp_path):
    """Defect 9: a header without `layers` gave `KeyError: 'layers'`, and one of
    version 99 loaded silently."""
    content, message = _header_variants()[case]
    path = tmp_path / "bad.eqx"
    path.write_bytes(content + b"\n")
    model, state = eqx.nn.make_with_state(MLP)()
    before = _leaves((model, state))
    with pytest.raises(ValueError, match=f"bad.eqx: not a checkpoint.*{message}"):
        eqx_norm.load(path, model, state)
    _assert_same((model, state), before)
    assert path.read_bytes() == content + b"\n"


def test_recalibrate_errors_name_public_things():
    """Defect 10: on a frozen model with batch size 1 the error named the internal
    `_Record()` strategy and advised switching to 'frozen'; layers named "batch"
    and ("batch",) were told to pass a `forward=` that does not exist."""
    model, state = _trained_mlp()
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
    x = 3 + 2 * jax.random.normal(jax.random.key(2), (16, 4))
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


def _idx_header(code: int, shape: tuple[int, ...]) -> bytes:
    head = bytes([0, 0, code, len(shape)])
    return head + b"".join(d.to_bytes(4, "big") for d in shape)


def test_idx_header_size_overflow_is_an_idx_error(tmp_path):
    """Defect 11: dimensions 2**31 x 2**31 x 4 made the byte count wrap to 0."""
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(_idx_header(0x08, (2**31, 2**31, 4)))
    with pytest.raises(data.IDXError, match=r"huge-idx3-ubyte: truncated.*2147483648"):
        data.read_idx(path)


def _write_dataset(folder, images: bytes, labels: bytes):
    (folder / "train-images-idx3-ubyte").write_bytes(images)
    (folder / "train-labels-idx1-ubyte").write_bytes(labels)


def test_load_dataset_refuses_images_that_are_not_8_bit(tmp_path):
    """Defect 12: int32 IDX images (values up to 1000) came back up to 3.92,
    although the docstring promises [0, 1]."""
    images = np.full((2, 28, 28), 1000, ">i4")
    labels = np.array([1, 2], np.uint8)
    _write_dataset(
        tmp_path,
        _idx_header(0x0C, images.shape) + images.tobytes(),
        _idx_header(0x08, labels.shape) + labels.tobytes(),
    )
    with pytest.raises(data.IDXError, match="stored as int32.*8-bit images"):
        data.load_dataset("mnist", folder=tmp_path)


# ------------------------------------------------------- the layer, more widely


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
    kwargs = {"input_size": 3, "axis_name": "batch", **kwargs}
    with pytest.raises(error, match=message):
        eqx_norm.BatchNorm(**kwargs)


def test_numpy_and_jax_scalars_are_accepted_as_numbers():
    bn = eqx_norm.BatchNorm(
        np.int64(3), "batch", momentum=np.float32(0.9), eps=jnp.array(1e-3)
    )
    assert bn.input_size == 3 and isinstance(bn.momentum, float)
    assert bn.eps == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "make_approach, message",
    [
        (lambda: eqx_norm.Renorm(d_max=-1.0), "`d_max` must be at least 0"),
        (lambda: eqx_norm.Renorm(r_max=float("nan")), "`r_max` must be at least 1"),
    ],
    ids=["negative-d_max", "nan-r_max"],
)
def test_bad_strategy_hyperparameters(make_approach, message):
    with pytest.raises(ValueError, match=message):
        make_approach()


@pytest.mark.parametrize("dtype", [jnp.complex64])
def test_complex_input_is_a_type_error(dtype):
    bn, state = make(3)
    with pytest.raises(TypeError, match="complex64.*floating-point input only"):
        apply(bn, jnp.ones((4, 3), dtype), state)


def test_a_scalar_example_names_the_shape():
    bn, state = make(3)
    with pytest.raises(ValueError, match=r"input_size=3.*shape \(\)"):
        apply(bn, jnp.ones((4,)), state)


@pytest.mark.parametrize("approach", list(eqx_norm.APPROACHES))
@pytest.mark.parametrize(
    "poison", [jnp.nan, jnp.inf, -jnp.inf, 3e38], ids=["nan", "inf", "-inf", "3e38"]
)
def test_bad_batches_never_change_the_state(approach, poison):
    """NaN, infinities and values whose square overflows float32: the state is
    bit-for-bit unchanged, in every approach."""
    bn, state = make(3, approach=approach)
    for x in batches(jax.random.key(0), 2, (8, 3, 2)):
        _, state = apply(bn, x, state)
    before = _leaves(state)
    bad = batches(jax.random.key(1), 1, (8, 3, 2))[0].at[2, 1, 0].set(poison)
    _, after = jax.jit(lambda x, s: apply(bn, x, s))(bad, state)
    _assert_same(after, before)


@pytest.mark.parametrize("approach", ["ema", "adam-correction", "smooth-start"])
def test_constant_channel_stays_finite_in_inference_over_many_steps(approach):
    bn, state = make(2, approach=approach, momentum=0.999)
    for k in jax.random.split(jax.random.key(0), 5):
        x = jnp.stack([jnp.zeros(16), jax.random.normal(k, (16,))], axis=1)
        _, state = apply(bn, x, state)
    _, var = bn.statistics(state)
    assert float(var[0]) == 0.0
    y, _ = apply(bn, jnp.ones((4, 2)), state, inference=True)
    assert np.all(np.isfinite(y))


# ---------------------------------------------------------------- SAM, widely


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


def test_sam_accepts_numpy_jax_scalars_and_schedules():
    for rho in (np.float32(0.05), jnp.array(0.05), optax.linear_schedule(0, 0.1, 5)):
        eqx_norm.sam(optax.sgd(0.1), rho=rho)


def test_per_device_perturbation_without_axis_name_is_refused():
    with pytest.raises(ValueError, match="needs the data axis"):
        eqx_norm.sam_step(mse_loss, optax.sgd(0.1), per_device_perturbation=True)


# ----------------------------------------------------------- checkpoints, widely


def test_load_of_a_truncated_checkpoint_names_the_file(tmp_path):
    model, state = _trained_mlp()
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    content = path.read_bytes()
    for cut in (len(content) - 5, content.index(b"\n") + 1, len(content) // 2):
        path.write_bytes(content[:cut])
        like = eqx.nn.make_with_state(MLP)()
        before = _leaves(like)
        with pytest.raises(ValueError, match="model.eqx: does not match"):
            eqx_norm.load(path, *like)
        _assert_same(like, before)


def test_load_of_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        eqx_norm.load(tmp_path / "nothing.eqx", *eqx.nn.make_with_state(MLP)())


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_save_to_a_bad_path_leaves_nothing(where, tmp_path):
    target = tmp_path / "missing" / "model.eqx"
    if where == "a-folder":
        target = tmp_path / "model.eqx"
        target.mkdir()
    with pytest.raises(OSError):
        eqx_norm.save(target, *_trained_mlp())
    assert [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")] == []


def test_save_failing_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    model, state = _trained_mlp()
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    content = path.read_bytes()

    def half_then_fail(f, tree):
        f.write(b"\x93NUMPY half a leaf")
        raise KeyboardInterrupt  # as an interrupted save, not only an OSError

    monkeypatch.setattr(eqx, "tree_serialise_leaves", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        eqx_norm.save(path, model, state)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["model.eqx"]


# ----------------------------------------------------------------- tools, widely


def test_set_approach_where_matching_nothing():
    model, _ = _trained_mlp()
    with pytest.raises(ValueError, match="`where` matched no BatchNorm"):
        eqx_norm.set_approach(model, "ema", where=lambda bn: bn.input_size == 99)


@pytest.mark.parametrize("tool", ["recalibrate", "diagnose", "set_approach"])
def test_tools_on_a_model_without_batch_norm(tool):
    linear = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    _, state = _trained_mlp()
    call = {
        "recalibrate": lambda: eqx_norm.recalibrate(linear, state, [jnp.ones((2, 2))]),
        "diagnose": lambda: eqx_norm.diagnose(linear, state, jnp.ones((2, 2))),
        "set_approach": lambda: eqx_norm.set_approach(linear, "ema"),
    }[tool]
    with pytest.raises(ValueError, match=f"`{tool}` found no `eqx_norm.BatchNorm`"):
        call()


def test_recalibrate_with_a_non_finite_batch_leaves_the_state():
    model, state = _trained_mlp()
    before = _leaves(state)
    bad = jnp.ones((8, 4)).at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="batch 0 gave non-finite statistics"):
        eqx_norm.recalibrate(model, state, [bad])
    _assert_same(state, before)


def test_from_equinox_without_equinox_batch_norm():
    model, state = _trained_mlp()
    with pytest.raises(ValueError, match="found no `eqx.nn.BatchNorm`"):
        eqx_norm.from_equinox(model, state)


# ------------------------------------------------------------------ data, widely


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "0 bytes, too short"),
        (b"\x00\x00\x08", "3 bytes, too short"),
        (_idx_header(0x08, (2, 2))[:6], "truncated inside its header"),
        (bytes([0, 0, 0x08, 3]) + (2**32 - 1).to_bytes(4, "big") * 3, "truncated"),
        (_idx_header(0x0D, (2,)) + b"\x00" * 7, r"truncated.*8 bytes of data"),
        (_idx_header(0x08, (2,)) + b"\x00" * 3, "has trailing bytes"),
        (gzip.compress(b"\x00\x00\x08\x01" + (1).to_bytes(4, "big"))[:-4], "gzip"),
        (b"\x1f\x8b" + b"\x00" * 20, "gzip stream is corrupt"),
        (bytes([0, 0, 0x0A, 1]) + b"\x00" * 8, "unknown IDX type code 0x0a"),
    ],
    ids=[
        "empty",
        "three-bytes",
        "cut-header",
        "max-dims",
        "short-floats",
        "trailing",
        "gzip-cut-trailer",
        "gzip-garbage",
        "code-0x0a",
    ],
)
def test_more_bad_idx_files(content, message, tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(data.IDXError, match=message) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([1, -2], np.int8), "non-negative integers"),
        (np.array([1.0, 2.5], ">f4"), "non-negative integers"),
    ],
    ids=["negative", "float"],
)
def test_load_dataset_refuses_bad_labels(labels, message, tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    code = {np.dtype(np.int8): 0x09, np.dtype(">f4"): 0x0D}[labels.dtype]
    _write_dataset(
        tmp_path,
        _idx_header(0x08, images.shape) + images.tobytes(),
        _idx_header(code, labels.shape) + labels.tobytes(),
    )
    with pytest.raises(data.IDXError, match=message):
        data.load_dataset("mnist", folder=tmp_path)


def test_load_dataset_images_of_the_wrong_rank(tmp_path):
    images = np.zeros((2, 28 * 28), np.uint8)
    labels = np.zeros(2, np.uint8)
    _write_dataset(
        tmp_path,
        _idx_header(0x08, images.shape) + images.tobytes(),
        _idx_header(0x08, labels.shape) + labels.tobytes(),
    )
    with pytest.raises(data.IDXError, match=r"expected \(N, H, W\) images"):
        data.load_dataset("mnist", folder=tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 1}, "`batch_size` must be at least 2"),
        ({"steps": 0}, "`steps` must be at least 1"),
        ({"seeds": 0}, "`seeds` must be at least 1"),
        ({"approaches": ("bach",)}, "unknown approach 'bach'"),
        ({"approaches": ()}, "`approaches` is empty"),
        ({"dataset": "cifar"}, "`dataset` must be one of"),
    ],
    ids=["batch-1", "steps-0", "seeds-0", "unknown-approach", "no-approach", "cifar"],
)
def test_experiment_config_refuses_bad_settings(kwargs, message):
    from eqx_norm import experiments

    with pytest.raises(ValueError, match=message):
        experiments.Config(**kwargs)


def test_checkpoint_compares_approaches_by_value(tmp_path):
    """`Renorm()` equals `Renorm(r_max=3)` but their reprs differ: a checkpoint
    compared by repr refused to load into an equal model. A version-1 file (which
    stored reprs) still loads."""
    model, state = _trained_mlp(eqx_norm.Renorm())
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    same = eqx.nn.make_with_state(MLP)(eqx_norm.Renorm(r_max=3))
    _assert_same(eqx_norm.load(path, *same), _leaves((model, state)))
    with pytest.raises(ValueError, match=r'approach "renorm".*eqx_norm\.Renorm\(r_max=4'):
        eqx_norm.load(path, *eqx.nn.make_with_state(MLP)(eqx_norm.Renorm(r_max=4)))
    header, rest = path.read_bytes().split(b"\n", 1)
    old = json.loads(header)
    old["version"] = 1
    for layer in old["layers"]:
        layer["approach"] = layer.pop("approach_repr")
    path.write_bytes(json.dumps(old).encode() + b"\n" + rest)
    like = eqx.nn.make_with_state(MLP)(eqx_norm.Renorm())
    _assert_same(eqx_norm.load(path, *like), _leaves((model, state)))


@pytest.mark.slow  # a subprocess
def test_imports_from_a_source_tree_that_is_not_installed():
    """`import eqx_norm` from a checkout on `PYTHONPATH` (no package metadata, as on
    a machine where nothing can be installed) works, with an unknown version."""
    script = textwrap.dedent(
        """
        import importlib.metadata as metadata

        installed = metadata.version

        def version(name):
            if name == "eqx_norm":
                raise metadata.PackageNotFoundError(name)
            return installed(name)

        metadata.version = version
        import eqx_norm

        print(eqx_norm.__version__, eqx_norm.BatchNorm.__name__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["unknown", "BatchNorm"]


@pytest.mark.slow  # a subprocess
def test_string_numbers_are_refused_without_the_type_checker():
    """The suite runs with jaxtyping's runtime type checks, which would refuse a
    string where a number goes before the package's own checks ran; a user has no
    such checks. Without them (a fresh interpreter), each of these names the
    argument in a `TypeError` (`float("0.9")` would silently accept the first)."""
    script = textwrap.dedent(
        """
        import equinox as eqx
        import optax
        import eqx_norm

        cases = {
            "momentum": lambda: eqx_norm.BatchNorm(3, "batch", momentum="0.9"),
            "eps": lambda: eqx_norm.BatchNorm(3, "batch", eps=b"1e-5"),
            "r_max": lambda: eqx_norm.Renorm(r_max="3"),
            "d_max": lambda: eqx_norm.Renorm(d_max=True),
            "every": lambda: eqx_norm.looksam(optax.sgd(0.1), every="5"),
            "alpha": lambda: eqx_norm.looksam(optax.sgd(0.1), alpha="0.7"),
            "eta": lambda: eqx_norm.sam(optax.sgd(0.1), eta=lambda t: 0.01),
            "micro_batches": lambda: eqx_norm.sam_step(
                lambda *a: a, optax.sgd(0.1), micro_batches="2"
            ),
        }
        for name, make in cases.items():
            try:
                make()
                print(name, "accepted")
            except TypeError as error:
                print(name, f"`{name}`" in str(error))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "momentum", "True", "eps", "True", "r_max", "True", "d_max", "True",
        "every", "True", "alpha", "True", "eta", "True", "micro_batches", "True",
    ]  # fmt: skip
