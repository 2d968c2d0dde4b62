"""Several devices: 8 CPU devices (XLA_FLAGS, set in conftest.py) stand in for 8
accelerators."""

import os
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqx_norm

from ..helpers import (
    Net,
    apply,
    as_a_user_calls_it,
    assert_same,
    batches,
    clone,
    leaves,
    make,
    mse_loss,
    regression_data,
    train_step,
    with_affine,
)

APPROACHES = list(eqx_norm.APPROACHES)

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS is set in conftest.py)"
)


def mesh(shape=(8,), names=("data",), types=AxisType.Auto):
    return jax.make_mesh(shape, names, axis_types=(types,) * len(shape))


def _shard_map_step(bn, mesh_, names=("data",)):
    """Style (b): one training step inside shard_map, the layer named after the
    mesh axes and the vmap axis."""
    spec = P(names if len(names) > 1 else names[0])

    def body(x, g, state):
        def loss(x):
            y, new_state = apply(bn, x, state)
            return jnp.sum(g * y), (y, new_state)

        (_, (y, new_state)), dx = jax.value_and_grad(loss, has_aux=True)(x)
        return y, dx, new_state

    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh_,
            in_specs=(spec, spec, P()),
            out_specs=(spec, spec, P()),
            check_vma=False,
        )
    )


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize("style", ["jit", "shard_map"])
def test_sharded_equals_one_device(approach, style, getkey):
    """10 steps: outputs, input gradients and state equal one device on the full
    batch within 1e-5."""
    m = mesh()
    ref_bn, ref_state = make(3, approach=approach, momentum=0.9)
    ref_bn = with_affine(ref_bn, getkey())
    axis_name = ("data", "batch") if style == "shard_map" else "batch"
    bn, state = make(3, approach=approach, momentum=0.9, axis_name=axis_name)
    bn = eqx.tree_at(lambda b: (b.weight, b.bias), bn, (ref_bn.weight, ref_bn.bias))
    sharded = NamedSharding(m, P("data"))
    state = jax.device_put(state, NamedSharding(m, P()))
    mapped = _shard_map_step(bn, m)
    for t, x in enumerate(batches(getkey(), 10, (32, 3, 4))):
        g = jax.random.normal(getkey(), x.shape)
        y_ref, dx_ref, ref_state = train_step(ref_bn, x, g, ref_state)
        xs, gs = jax.device_put(x, sharded), jax.device_put(g, sharded)
        if style == "shard_map":
            y, dx, state = mapped(xs, gs, state)
        else:
            y, dx, state = train_step(bn, xs, gs, state)
        assert y.sharding.is_equivalent_to(sharded, y.ndim)
        # The first step has no running mean to shift by, so its variance carries
        # the float32 cancellation that BatchNorm's docstring states; the two sides
        # reduce in different orders and may differ by more there.
        tol = 1e-5 if t else 1e-4
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=tol, err_msg=f"{t}")
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=tol, err_msg=f"{t}")
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _all_reduces(compiled_text: str | None) -> int:
    assert compiled_text is not None
    return len(re.findall(r"\ball-reduce(-start)?\(", compiled_text))


@pytest.mark.parametrize("approach", ["batch", "ema", "renorm"])
def test_one_all_reduce_per_call(approach, getkey):
    """Exactly one all-reduce per BatchNorm call in the compiled program: under jit
    over an Auto mesh, and inside shard_map over Auto and Explicit meshes. (JAX's
    Explicit mode does not yet batch collectives over vmap axes under jit.)"""
    x = jax.random.normal(getkey(), (32, 3, 4))
    m = mesh()
    xs = jax.device_put(x, NamedSharding(m, P("data")))
    bn, state = make(3, approach=approach)
    forward = jax.jit(lambda x, s: apply(bn, x, s))
    assert _all_reduces(forward.lower(xs, state).compile().as_text()) == 1
    # Two layers, two all-reduces.
    two, two_state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx_norm.BatchNorm(3, "batch", approach=approach),
            eqx.nn.Lambda(jnp.tanh),
            eqx_norm.BatchNorm(3, "batch", approach=approach),
        ]
    )
    forward2 = jax.jit(lambda x, s: apply(two, x, s))
    assert _all_reduces(forward2.lower(xs, two_state).compile().as_text()) == 2
    for types in (AxisType.Auto, AxisType.Explicit):
        m = mesh(types=types)
        bn2, state2 = make(3, approach=approach, axis_name=("data", "batch"))
        body = jax.shard_map(
            lambda x, s: apply(bn2, x, s),
            mesh=m,
            in_specs=(P("data"), P()),
            out_specs=(P("data"), P()),
            check_vma=False,
        )
        xs = jax.device_put(x, NamedSharding(m, P("data")))
        state2 = eqx_norm.replicate(state2, m)
        assert _all_reduces(jax.jit(body).lower(xs, state2).compile().as_text()) == 1


def test_shard_map_with_checked_axes_is_refused(getkey):
    """JAX's varying-axes check refuses a collective over a `vmap` axis inside
    `shard_map`; the layer's error names the fix, `check_vma=False` (which
    `eqx.nn.BatchNorm` needs too)."""
    bn, state = make(3, axis_name=("data", "batch"))
    body = jax.shard_map(
        lambda x, s: apply(bn, x, s),
        mesh=mesh(),
        in_specs=(P("data"), P()),
        out_specs=(P("data"), P()),
    )
    x = jax.device_put(jnp.ones((16, 3)), NamedSharding(mesh(), P("data")))
    with pytest.raises(
        ValueError, match=r"axis_name=\('data', 'batch'\).*check_vma=False"
    ):
        jax.jit(body)(x, state)


def test_subgroup_statistics(getkey):
    """A (2, 4) mesh: statistics over the 4 devices of each group only equal
    single-device statistics of each group's half of the batch."""
    m = mesh((2, 4), ("group", "data"))
    bn, state = make(3, momentum=0.9, axis_name=("data", "batch"))
    ref, ref_state = make(3, momentum=0.9)
    ref_states = [ref_state, clone(ref_state)]
    spec = P(("group", "data"))

    def body(x, stacked):
        # Each group holds its own statistics: a leading axis over groups.
        y, state = apply(bn, x, jax.tree.map(lambda a: a[0], stacked))
        return y, jax.tree.map(lambda a: a[None], state)

    step = jax.jit(
        jax.shard_map(
            body,
            mesh=m,
            in_specs=(spec, P("group")),
            out_specs=(spec, P("group")),
            check_vma=False,
        )
    )
    per_group = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    for x in batches(getkey(), 3, (32, 3, 5)):
        y, per_group = step(jax.device_put(x, NamedSharding(m, spec)), per_group)
        for i in range(2):
            y_ref, ref_states[i] = apply(ref, x[16 * i : 16 * (i + 1)], ref_states[i])
            np.testing.assert_allclose(
                y[16 * i : 16 * (i + 1)], y_ref, rtol=1e-5, atol=1e-5
            )
            mean, var = ref.statistics(ref_states[i])
            group = jax.tree.map(lambda a: a[i], per_group)
            np.testing.assert_allclose(
                bn.statistics(group)[0], mean, rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(bn.statistics(group)[1], var, rtol=1e-5)
        assert not np.allclose(
            per_group.get(bn.state_index).mean[0], per_group.get(bn.state_index).mean[1]
        )


def net(axis_name, key, norm=True):
    return Net(key, axis_name=axis_name, norm=norm, activation=jax.nn.tanh)


loss_fn = mse_loss


def _params(model):
    return jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))


def _shard_mapped(step, model, mesh_):
    """`step(model, state, opt_state, x, y)` inside `shard_map`, the batch split over
    "data" and everything else replicated; returns it over the model's arrays, and
    the model's static part."""
    _, static = eqx.partition(model, eqx.is_array)

    def body(params, state, opt_state, x, y):
        model, state, opt_state, loss = step(
            eqx.combine(params, static), state, opt_state, x, y
        )
        return eqx.filter(model, eqx.is_array), state, opt_state, loss

    mapped = jax.shard_map(
        body,
        mesh=mesh_,
        in_specs=(P(), P(), P(), P("data"), P("data")),
        out_specs=P(),
        check_vma=False,
    )
    return jax.jit(mapped), static


@pytest.mark.parametrize("style", ["jit", "shard_map"])
def test_sam_with_sync_batch_norm_equals_one_device(style, getkey):
    key = getkey()
    opt = eqx_norm.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    ref, ref_state = eqx.nn.make_with_state(net)("batch", key)
    ref_opt = opt.init(eqx.filter(ref, eqx.is_inexact_array))
    ref_step = eqx.filter_jit(eqx_norm.sam_step(loss_fn, opt))
    m = mesh()
    data = NamedSharding(m, P("data"))
    if style == "jit":
        model, state = eqx.nn.make_with_state(net)("batch", key)
        step = eqx.filter_jit(eqx_norm.sam_step(loss_fn, opt))
    else:
        model, state = eqx.nn.make_with_state(net)(("data", "batch"), key)
        inner = eqx_norm.sam_step(loss_fn, opt, axis_name="data")
        mapped, static = _shard_mapped(inner, model, m)

        def step(model, state, opt_state, x, y):
            params, _ = eqx.partition(model, eqx.is_array)
            params, state, opt_state, loss = mapped(params, state, opt_state, x, y)
            return eqx.combine(params, static), state, opt_state, loss

    model, state = eqx_norm.replicate((model, state), m)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    for _ in range(5):
        x, y = regression_data(getkey(), n=32)
        ref, ref_state, ref_opt, ref_loss = ref_step(ref, ref_state, ref_opt, x, y)
        xs, ys = eqx_norm.shard_batch((x, y), m)
        assert xs.sharding.is_equivalent_to(data, 2)
        model, state, opt_state, loss = step(model, state, opt_state, xs, ys)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for a, b in zip(_params(model), _params(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_per_device_perturbation_equals_per_shard_reference(getkey):
    """m-sharpness: each device perturbs with the gradient of its own shard, and
    only the gradients at the perturbed points are averaged."""
    rho, lr = 0.1, 0.2
    model, state = eqx.nn.make_with_state(net)("batch", getkey(), norm=False)
    opt = eqx_norm.sam(optax.sgd(lr), rho=rho)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    m = mesh()
    inner = eqx_norm.sam_step(
        loss_fn, opt, axis_name="data", per_device_perturbation=True
    )
    params, _ = eqx.partition(model, eqx.is_array)
    mapped, static = _shard_mapped(inner, model, m)
    ref = eqx.filter(model, eqx.is_inexact_array)

    def shard_loss(p, x, y):
        return loss_fn(eqx.combine(p, static), clone(state), x, y)[0]

    for _ in range(3):
        x, y = regression_data(getkey(), n=32)
        params, state, opt_state, _ = mapped(params, state, opt_state, x, y)
        second = []
        for d in range(8):
            xd, yd = x[4 * d : 4 * d + 4], y[4 * d : 4 * d + 4]
            g = jax.grad(shard_loss)(ref, xd, yd)
            norm = optax.tree.norm(g)
            perturbed = jax.tree.map(lambda w, g: w + rho * g / norm, ref, g)
            second.append(jax.grad(shard_loss)(perturbed, xd, yd))
        mean_second = jax.tree.map(lambda *gs: sum(gs) / 8, *second)
        ref = jax.tree.map(lambda w, g: w - lr * g, ref, mean_second)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Not the same as averaging first: the two modes differ.
    with pytest.raises(ValueError, match="needs the data axis"):
        eqx_norm.sam_step(loss_fn, opt, per_device_perturbation=True)


@pytest.mark.parametrize("mode", ["whole-batch", "per-micro-batch", "per-device"])
def test_micro_batches_inside_shard_map_equal_one_device(mode, getkey):
    """Two micro-batches of 2 examples on each of 8 devices. With whole-batch
    perturbation and synchronised BatchNorm, micro-batch i is the union over
    devices of each device's i-th: one device with 2 micro-batches of the batch
    reordered that way. Without BatchNorm: per micro-batch, each device's
    micro-batches are perturbed by their own gradients (one device with 16
    micro-batches perturbed each by its own); per device, each device's shard is
    (one device with 8 such micro-batches)."""
    key = getkey()
    per = mode != "whole-batch"
    perturbation = "per-micro-batch" if per else "whole-batch"
    opt = eqx_norm.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    ref, ref_state = eqx.nn.make_with_state(net)("batch", key, norm=not per)
    model, state = eqx.nn.make_with_state(net)(("data", "batch"), key, norm=not per)
    ref_m = {"whole-batch": 2, "per-micro-batch": 16, "per-device": 8}[mode]
    ref_step = eqx.filter_jit(
        eqx_norm.sam_step(loss_fn, opt, micro_batches=ref_m, perturbation=perturbation)
    )
    inner = eqx_norm.sam_step(
        loss_fn,
        opt,
        axis_name="data",
        micro_batches=2,
        perturbation="per-micro-batch" if mode == "per-micro-batch" else "whole-batch",
        per_device_perturbation=mode == "per-device",
    )
    mapped, static = _shard_mapped(inner, model, mesh())
    params, _ = eqx.partition(model, eqx.is_array)
    ref_opt = opt.init(eqx.filter(ref, eqx.is_inexact_array))
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    # Row 4d + 2i + j (device d, micro-batch i, example j) to row 16i + 2d + j.
    order = np.arange(32).reshape(8, 2, 2).transpose(1, 0, 2).reshape(-1)
    for _ in range(2):
        x, y = regression_data(getkey(), n=32)
        params, state, opt_state, loss = mapped(params, state, opt_state, x, y)
        if not per:
            x, y = x[order], y[order]
        ref, ref_state, ref_opt, ref_loss = ref_step(ref, ref_state, ref_opt, x, y)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(params), _params(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_uneven_batch_is_a_clear_error():
    m = mesh()
    with pytest.raises(ValueError, match="batch of 60 does not split evenly over 8"):
        eqx_norm.shard_batch(jnp.ones((60, 3)), m)
    with pytest.raises(ValueError, match="the mesh has axes"):
        eqx_norm.shard_batch(jnp.ones((64, 3)), m, axis="model")


def test_process_local_rows_on_one_process_are_the_global_batch():
    """With one process, its rows are the global batch: `process_local=True` places
    them as the global form does and gives its errors."""
    m = mesh()
    x = jnp.arange(48.0).reshape(16, 3)
    local, whole = (
        eqx_norm.shard_batch({"x": x}, m, process_local=flag)["x"]
        for flag in (True, False)
    )
    np.testing.assert_array_equal(local, whole)
    assert local.sharding.is_equivalent_to(whole.sharding, 2)
    with pytest.raises(ValueError, match="batch of 60 does not split evenly over 8"):
        eqx_norm.shard_batch(jnp.ones((60, 3)), m, process_local=True)


@pytest.mark.slow  # a subprocess
def test_multi_device_example_trains(tmp_path):
    """examples/multi_device.py: SyncBN and SAM on 8 devices, a few steps."""
    script = Path(__file__).resolve().parents[2] / "examples" / "multi_device.py"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "8 devices, 30 SAM steps" in out
    accuracy = float(out.rsplit("test accuracy", 1)[1])
    assert accuracy > 0.5


@pytest.mark.parametrize("leaf", [3.0, np.float32(2.0), [1.0, 2.0], "rows"])
@pytest.mark.parametrize("process_local", [False, True])
def test_shard_batch_names_a_leaf_that_is_not_a_batch_array(leaf, process_local):
    """A scalar leaf gave `IndexError: tuple index out of range`, a list or a
    string an `AttributeError`: now a `ValueError` saying what a leaf must be."""
    with pytest.raises(ValueError, match="every leaf of `batch` must be an array"):
        eqx_norm.shard_batch(
            (jnp.ones((8, 3)), leaf), mesh(), process_local=process_local
        )


def _record(batch):
    """The values and shardings of a batch's arrays, to check it unchanged."""
    arrays = jax.tree.leaves(batch)
    return leaves(arrays), [getattr(a, "sharding", None) for a in arrays]


_UNEVEN = {
    "one-row": (
        lambda: eqx_norm.shard_batch(jnp.ones((1, 3)), mesh()),
        r"A global batch of 1 does not split evenly over 8 devices.*e\.g\. 8\.",
    ),
    "one-row-process-local": (
        lambda: eqx_norm.shard_batch(jnp.ones((1, 3)), mesh(), process_local=True),
        r"A global batch of 1 does not split evenly over 8 devices.*e\.g\. 8\.",
    ),
    "both-axes-of-a-2d-mesh": (
        lambda: eqx_norm.shard_batch(
            jnp.ones((6, 3)), mesh((2, 4), ("data", "model")), ("data", "model")
        ),
        r"batch of 6 does not split evenly over 8 devices \(mesh axis \('data', "
        r"'model'\)\)",
    ),
    "traced-under-jax-jit": (
        lambda: jax.jit(lambda x: eqx_norm.shard_batch(x, mesh()))(jnp.ones((60, 3))),
        r"A global batch of 60 does not split evenly over 8 devices",
    ),
    "an-empty-axis-name": (
        lambda: eqx_norm.shard_batch(jnp.ones((8, 3)), mesh(), ""),
        r"`shard_batch\(axis=''\)`: the mesh has axes \('data',\)",
    ),
    "an-axis-the-mesh-lacks": (
        lambda: eqx_norm.shard_batch(jnp.ones((8, 3)), mesh(), ("data", "model")),
        r"`shard_batch\(axis=\('data', 'model'\)\)`: the mesh has axes",
    ),
    "a-zero-dimensional-jax-array": (
        lambda: eqx_norm.shard_batch((jnp.ones((8, 3)), jnp.asarray(2.0)), mesh()),
        r"every leaf of `batch` must be an array with a leading batch axis; got "
        r"Array\(2\.",
    ),
}


@pytest.mark.parametrize("case", list(_UNEVEN))
def test_shard_batch_refuses_a_batch_or_axis_that_does_not_fit_the_mesh(case):
    """Each names the sizes or the axes and a value that works, traced or not,
    with process-local rows or not; the arrays given are unchanged."""
    call, message = _UNEVEN[case]
    batch = jnp.ones((8, 3))
    before = _record(batch)
    with pytest.raises(ValueError, match=message):
        call()
    assert_same(batch, before[0])
    assert _record(batch)[1] == before[1]


@pytest.mark.parametrize("tool", ["shard_batch", "replicate"])
@pytest.mark.parametrize(
    "not_a_mesh", [None, "devices"], ids=["none", "a-list-of-devices"]
)
def test_a_mesh_that_is_not_a_mesh_is_named(tool, not_a_mesh):
    not_a_mesh = jax.devices() if not_a_mesh == "devices" else not_a_mesh
    batch = {"x": jnp.ones((8, 3))}
    before = _record(batch)
    call = getattr(eqx_norm, tool)
    with as_a_user_calls_it(), pytest.raises(TypeError, match=r"`mesh`.*make_mesh"):
        call(batch, not_a_mesh)
    assert_same(batch, before[0])


@pytest.mark.parametrize("axis", [None, 0], ids=["none", "an-int"])
def test_shard_batch_names_an_axis_that_is_not_a_name(axis):
    batch = jnp.ones((8, 3))
    before = _record(batch)
    with as_a_user_calls_it(), pytest.raises(TypeError, match=r"`axis`.*'data'"):
        eqx_norm.shard_batch(batch, mesh(), axis)
    assert_same(batch, before[0])


@pytest.mark.parametrize("process_local", [False, True])
def test_shard_batch_refuses_arrays_of_different_leading_sizes(process_local):
    batch = (jnp.ones((8, 3)), jnp.ones((16,)))
    before = _record(batch)
    with pytest.raises(ValueError, match=r"`batch`.*leading.*\b8\b.*\b16\b"):
        eqx_norm.shard_batch(batch, mesh(), process_local=process_local)
    assert_same(batch, before[0])


def test_shard_batch_names_a_process_local_that_is_not_a_bool():
    batch = jnp.ones((8, 3))
    before = _record(batch)
    with (
        as_a_user_calls_it(),
        pytest.raises(TypeError, match=r"`process_local` must be True or False"),
    ):
        eqx_norm.shard_batch(batch, mesh(), process_local="no")  # pyright: ignore
    assert_same(batch, before[0])


def test_an_empty_process_local_batch_is_refused_on_one_process_too():
    batch = jnp.ones((0, 3))
    before = _record(batch)
    with pytest.raises(ValueError, match=r"passes 0 rows"):
        eqx_norm.shard_batch(batch, mesh(), process_local=True)
    assert_same(batch, before[0])


def test_shard_batch_of_a_traced_batch_splits_it_over_the_mesh():
    """Regression: inside `jax.jit`, `device_put` left the traced batch replicated
    (spec `P()`), with no error; now the batch comes back split over 'data'."""
    x = jax.random.normal(jax.random.key(0), (16, 3))
    before = _record(x)
    y = jax.jit(lambda x: eqx_norm.shard_batch(x, mesh()))(x)
    assert y.sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(y, x)
    assert_same(x, before[0])
