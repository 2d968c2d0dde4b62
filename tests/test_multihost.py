"""Several hosts: two JAX processes of four CPU devices each, joined by
`jax.distributed` on this machine (see `tests/multihost.py`), against this test
process's eight devices. Each launch runs many checks and reports them all, so that
the few launches stay within a few minutes on two cores."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import multihost_utils
from jax.sharding import AxisType, PartitionSpec as P

import eqx_norm

from .helpers import mse_loss
from .multihost import launch, results

APPROACHES = list(eqx_norm.APPROACHES)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        jax.device_count() != 8,
        reason="compares against 8 devices (XLA_FLAGS is set in conftest.py)",
    ),
]


class AllApproaches(eqx.Module):
    """A regression network with a BatchNorm of each approach side by side (every
    approach by default), so that one compiled step covers them all."""

    first: eqx.nn.Linear
    norms: tuple[eqx_norm.BatchNorm, ...]
    last: eqx.nn.Linear

    def __init__(
        self,
        axis_name: str | tuple[str, ...] = "batch",
        approaches=APPROACHES,
        **options,
    ):
        k1, k2 = jax.random.split(jax.random.key(0))
        self.first = eqx.nn.Linear(4, 6, use_bias=False, key=k1)
        self.norms = tuple(
            eqx_norm.BatchNorm(6, axis_name, approach=a, momentum=0.9, **options)
            for a in approaches
        )
        self.last = eqx.nn.Linear(6 * len(approaches), 2, key=k2)

    def __call__(self, x, state):
        h = self.first(x)
        outs = []
        for bn in self.norms:
            y, state = bn(h, state)
            outs.append(jnp.tanh(y))
        return self.last(jnp.concatenate(outs)), state


def _mesh():
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def _data(t, n=32):
    rng = np.random.default_rng(t)
    x = 1 + 2 * rng.standard_normal((n, 4), np.float32)
    return x, rng.standard_normal((n, 2), np.float32)


def _rows(a):
    """This process's rows of a global batch: process i holds the i-th block."""
    n = a.shape[0] // jax.process_count()
    i = jax.process_index()
    return a[i * n : (i + 1) * n]


def _host(tree) -> list:
    """Every array of a pytree, gathered to this process, as nested lists."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_replicated:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x).tolist()

    return [one(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _optimizer():
    return eqx_norm.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)


def _jit_recipe(n=32, **layer):
    """The README's recipe: `jax.jit`, a replicated model, `shard_batch`, each
    process passing its own rows."""
    mesh = _mesh()
    model, state = eqx.nn.make_with_state(AllApproaches)(**layer)
    opt = _optimizer()
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    model, state, opt_state = eqx_norm.replicate((model, state, opt_state), mesh)
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))
    losses = []
    for t in range(3):
        x, y = _data(t, n)
        x, y = eqx_norm.shard_batch((_rows(x), _rows(y)), mesh, process_local=True)
        model, state, opt_state, loss = step(model, state, opt_state, x, y)
        losses.append(float(loss))
    return {"loss": losses, "leaves": _host((model, state))}


def _shard_map_recipe(approaches=APPROACHES, **options):
    """The docs' `shard_map` recipe: the layer names the mesh axis and the vmap
    axis, `sam_step` the mesh axis."""
    mesh = _mesh()
    model, state = eqx.nn.make_with_state(AllApproaches)(("data", "batch"), approaches)
    opt = _optimizer()
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    params, static = eqx.partition(model, eqx.is_array)
    inner = eqx_norm.sam_step(mse_loss, opt, axis_name="data", **options)

    def body(params, state, opt_state, x, y):
        model, state, opt_state, loss = inner(
            eqx.combine(params, static), state, opt_state, x, y
        )
        return eqx.filter(model, eqx.is_array), state, opt_state, loss

    step = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P(), P("data"), P("data")),
            out_specs=P(),
            check_vma=False,
        )
    )
    params, state, opt_state = eqx_norm.replicate((params, state, opt_state), mesh)
    losses = []
    for t in range(3):
        x, y = eqx_norm.shard_batch(_data(t), mesh)
        params, state, opt_state, loss = step(params, state, opt_state, x, y)
        losses.append(float(loss))
    return {"loss": losses, "leaves": _host((params, state))}


def _tools():
    """`recalibrate` and `diagnose` of a model on a sharded batch."""
    mesh = _mesh()
    model, state = eqx.nn.make_with_state(AllApproaches)()
    model, state = eqx_norm.replicate((model, state), mesh)
    batches = [eqx_norm.shard_batch(_data(t)[0], mesh) for t in range(2)]
    state = eqx_norm.recalibrate(model, state, batches)
    report = eqx_norm.diagnose(model, state, batches[0])
    fields = ("batch_mean", "batch_var", "running_mean", "running_var", "gap")
    return {
        "recalibrated": _host(state),
        "diagnosis": [
            [np.asarray(getattr(layer, f)).tolist() for f in fields]
            for layer in report.layers
        ],
    }


def _shard_batch_checks():
    """Each process's rows make the global batch; rows that do not fit are an error
    on every process, not a hang."""
    mesh = _mesh()
    x, y = _data(0)
    local = eqx_norm.shard_batch((_rows(x), _rows(y)), mesh, process_local=True)
    whole = eqx_norm.shard_batch((x, y), mesh)
    same = all(
        a.sharding.is_equivalent_to(b.sharding, a.ndim)
        for a, b in zip(local, whole, strict=True)
    )
    errors = []
    last = jax.process_count() - 1
    for rows in (12, 6):  # the last process passes fewer rows
        mine = x[:rows] if jax.process_index() == last else _rows(x)
        try:
            eqx_norm.shard_batch(mine, mesh, process_local=True)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return {"values": _host(local), "same sharding": same, "errors": errors}


def train(args):
    """Every recipe over 3 steps; the same numbers on 2 x 4 devices as on 1 x 8."""
    # The options of a SAM step do not depend on the approach: one layer will do.
    one = ("batch",)
    return {
        "jit": _jit_recipe(),
        # 48 rows, 24 per process: the ghost batch of rows 16 to 31 spans both.
        "ghost batches": _jit_recipe(48, approaches=one, virtual_batch_size=16),
        "shard_map": _shard_map_recipe(),
        "per-device perturbation": _shard_map_recipe(one, per_device_perturbation=True),
        "micro-batches": _shard_map_recipe(one, micro_batches=2),
        "micro-batches, each perturbed": _shard_map_recipe(
            one, micro_batches=2, perturbation="per-micro-batch"
        ),
        "recalibrate and diagnose": _tools(),
        "shard_batch": _shard_batch_checks(),
    }


def _assert_close(got, want, name):
    assert type(got) is type(want), name
    if isinstance(want, dict):
        assert got.keys() == want.keys(), name
        for key in want:
            _assert_close(got[key], want[key], f"{name}/{key}")
    elif isinstance(want, list) and want and isinstance(want[0], (list, dict)):
        assert len(got) == len(want), name
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{name}[{i}]")
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_processes_equal_one(tmp_path):
    """Two processes of four devices give the numbers of one process of eight, for
    every approach, recipe and option over 3 SAM steps, and for the tools."""
    launched = results(launch(f"{__name__}:train", folder=tmp_path))
    want = train({})
    assert want["shard_batch"]["errors"] == [
        "A global batch of 12 does not split evenly over 8 devices (mesh axis "
        "'data'); use a batch size that is a multiple of 8, e.g. 16.",
        "A global batch of 6 does not split evenly over 8 devices (mesh axis "
        "'data'); use a batch size that is a multiple of 8, e.g. 8.",
    ]
    for i, got in enumerate(launched):
        uneven, unsplit = got["shard_batch"].pop("errors")
        assert uneven.startswith(
            "`shard_batch(..., process_local=True)`: the processes pass batches of "
            "different shapes or dtypes (rows per process: [16, 12]; "
            f"process {i} passes float32[{16 if i == 0 else 12}, 4])."
        ), uneven
        assert unsplit == (
            "`shard_batch(..., process_local=True)`: process 1 passes 6 rows, which "
            "do not split over its 4 devices on mesh axis 'data'; give every "
            "process a multiple of 4 rows (a global batch that is a multiple of 8), "
            "e.g. 8 rows each."
        )
    want["shard_batch"].pop("errors")
    for i, got in enumerate(launched):
        _assert_close(got, want, f"process {i}")
