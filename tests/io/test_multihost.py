"""Several hosts: two JAX processes of four CPU devices each, joined by
`jax.distributed` on this machine (see `tests/multihost.py`), against this test
process's eight devices. Each launch runs many checks and reports them all, so that
the few launches stay within a few minutes on two cores."""

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqx_norm

from ..helpers import mse_loss
from .multihost import ROOT, launch, note, results, start

APPROACHES = list(eqx_norm.APPROACHES)

# The tests that start processes are in the slow tier and need eight devices here.
eight_devices = pytest.mark.skipif(
    jax.device_count() != 8,
    reason="compares against 8 devices (XLA_FLAGS is set in conftest.py)",
)


class AllApproaches(eqx.Module):
    """A regression network with a BatchNorm of each approach side by side (every
    approach by default), and one of ghost batches of `ghost` examples if given, so
    that one compiled step covers them all."""

    first: eqx.nn.Linear
    norms: tuple[eqx_norm.BatchNorm, ...]
    last: eqx.nn.Linear

    def __init__(
        self,
        axis_name: str | tuple[str, ...] = "batch",
        approaches=APPROACHES,
        ghost: int | None = None,
    ):
        k1, k2 = jax.random.split(jax.random.key(0))
        self.first = eqx.nn.Linear(4, 6, use_bias=False, key=k1)
        self.norms = tuple(
            eqx_norm.BatchNorm(6, axis_name, approach=a, momentum=0.9)
            for a in approaches
        ) + (
            ()
            if ghost is None
            else (eqx_norm.BatchNorm(6, axis_name, virtual_batch_size=ghost),)
        )
        self.last = eqx.nn.Linear(6 * len(self.norms), 2, key=k2)

    def __call__(self, x, state):
        h = self.first(x)
        outs = []
        for bn in self.norms:
            y, state = bn(h, state)
            outs.append(jnp.tanh(y))
        return self.last(jnp.concatenate(outs)), state


def _mesh():
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def _step_data(t, n=32):
    """The global batch of step `t` (what `helpers.regression_data` draws, but from
    NumPy seeded by the step): each process builds the same one on its host, with
    no key to share."""
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
        x, y = _step_data(t, n)
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
        x, y = eqx_norm.shard_batch(_step_data(t), mesh)
        params, state, opt_state, loss = step(params, state, opt_state, x, y)
        losses.append(float(loss))
    return {"loss": losses, "leaves": _host((params, state))}


def _tools():
    """`recalibrate` and `diagnose` of a model on a sharded batch."""
    mesh = _mesh()
    model, state = eqx.nn.make_with_state(AllApproaches)(approaches=("batch", "ema"))
    model, state = eqx_norm.replicate((model, state), mesh)
    batches = [eqx_norm.shard_batch(_step_data(t)[0], mesh) for t in range(2)]
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
    x, y = _step_data(0)
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
        # 48 rows, 24 per process: the ghost batch of rows 16 to 31 spans both.
        "jit, with ghost batches": _jit_recipe(48, ghost=16),
        "shard_map": _shard_map_recipe(),
        "micro-batches": _shard_map_recipe(one, micro_batches=2),
        "per-device and per-micro-batch perturbation": _shard_map_recipe(
            one,
            per_device_perturbation=True,
            micro_batches=2,
            perturbation="per-micro-batch",
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


@pytest.mark.slow
@eight_devices
def test_two_processes_equal_one(tmp_path):
    """Two processes of four devices give the numbers of one process of eight, for
    every approach, recipe and option over 3 SAM steps, and for the tools."""
    wait = start(f"{__name__}:train", folder=tmp_path)
    try:
        want = train({})  # while they run
    finally:
        launched = results(wait())
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


# ---------------------------------------------------------------------- checkpoints


class Wide(eqx.Module):
    """A layer whose weight rows and statistics split over 8 devices."""

    linear: eqx.nn.Linear
    bn: eqx_norm.BatchNorm

    def __init__(self, seed):
        self.linear = eqx.nn.Linear(4, 16, use_bias=False, key=jax.random.key(seed))
        self.bn = eqx_norm.BatchNorm(16, "batch", approach="ema")

    def __call__(self, x, state):
        return self.bn(self.linear(x), state)


def _wide(seed, split=True):
    """A `Wide` model and a state with statistics of its own, placed on the mesh:
    every array of 16 rows split over the devices of both processes (`split`) or
    replicated, the rest replicated."""
    model, state = eqx.nn.make_with_state(Wide)(seed)
    rng = np.random.default_rng(seed)
    stats = eqx_norm.RunningStats(
        jnp.asarray(rng.standard_normal(16, np.float32)),
        jnp.asarray(rng.uniform(0.5, 2, 16).astype(np.float32)),
        jnp.asarray(seed, jnp.int32),
    )
    state = state.set(model.bn.state_index, stats)
    mesh = _mesh()

    def place(x):
        if not isinstance(x, jax.Array):
            return x
        spec = P("data") if split and x.ndim and x.shape[0] == 16 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, (model, state))


def _check_loaded(loaded, like, want) -> None:
    """`loaded` has the values of `want` (a pytree, or its `_host` lists) and the
    shardings of `like`."""
    arrays = [jax.tree.leaves(eqx.filter(t, eqx.is_array)) for t in (loaded, like)]
    for a, b in zip(*arrays, strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    want = want if isinstance(want, list) else _host(want)
    for a, b in zip(_host(loaded), want, strict=True):
        np.testing.assert_array_equal(a, b)


def _orbax_failure(message):
    """Make Orbax fail on every process after writing the arrays, as a shared
    file system that fills up; returns the undo."""
    import orbax.checkpoint as ocp

    original = ocp.Checkpointer.save

    def fail(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise OSError(message)

    ocp.Checkpointer.save = fail
    return lambda: setattr(ocp.Checkpointer, "save", original)


def checkpoints(args):
    """Save and load with arrays split across processes (an Orbax folder beside
    the file) and with replicated arrays only (one file, as on one process)."""
    folder = Path(args["folder"])
    path = folder / "model.eqx"
    listing = {}

    def files():
        return sorted(p.name for p in folder.iterdir())

    first = _wide(1)
    eqx_norm.save(path, *first)
    listing["first save"] = files()
    like = _wide(2)
    _check_loaded(eqx_norm.load(path, *like), like, first)
    # Into a model placed otherwise: the sharding is the given model's.
    replicated = _wide(3, split=False)
    _check_loaded(eqx_norm.load(path, *replicated), replicated, first)

    second = _wide(4)
    eqx_norm.save(path, *second)
    listing["second save"] = files()
    errors = {}
    undo = _orbax_failure("No space left on device")
    try:
        eqx_norm.save(path, *_wide(5))
    except OSError as e:
        errors["orbax fails"] = str(e)
    finally:
        undo()
    listing["after a failed save"] = files()
    path.chmod(0o444)
    try:
        eqx_norm.save(path, *_wide(6))
    except PermissionError as e:
        errors["read-only"] = str(e)
    path.chmod(0o644)
    _check_loaded(eqx_norm.load(path, *like), like, second)

    # Replicated arrays only: process 0 writes the one file of one process.
    single = folder / "replicated.eqx"
    eqx_norm.save(single, *replicated)
    _check_loaded(eqx_norm.load(single, *like), like, replicated)
    eqx_norm.save(path, *replicated)  # over the checkpoint with a folder
    listing["replicated over split"] = files()
    _check_loaded(eqx_norm.load(path, *like), like, replicated)
    eqx_norm.save(path, *second)  # and back, for the test process to load
    return {
        "listing": listing,
        "errors": errors,
        "header": json.loads(path.read_bytes().split(b"\n")[0]),
        "second": _host(second),
    }


@pytest.mark.slow
@eight_devices
def test_checkpoints_of_arrays_split_across_processes(tmp_path, monkeypatch):
    """`save` and `load` on every process: values and shardings come back, a save
    that fails leaves the previous checkpoint, and this process (one of eight
    devices) loads what two processes wrote."""
    folder = tmp_path / "shared"
    folder.mkdir()
    first, second = results(
        launch(f"{__name__}:checkpoints", {"folder": str(folder)}, folder=tmp_path)
    )
    assert first["listing"] == second["listing"]
    listing = first["listing"]
    # The file, and the folder of arrays its header names; none left behind.
    (orbax,) = [n for n in listing["first save"] if n.endswith(".orbax")]
    assert listing["first save"] == ["model.eqx", orbax]
    (newer,) = [n for n in listing["second save"] if n.endswith(".orbax")]
    assert newer != orbax and listing["second save"] == ["model.eqx", newer]
    assert listing["after a failed save"] == listing["second save"]
    assert listing["replicated over split"] == ["model.eqx", "replicated.eqx"]
    read_only = (
        f"`eqx_norm.save`: {str(folder / 'model.eqx')!r} is read-only, and saving "
        "would replace it; make it writable first (`chmod u+w`) or save to another "
        "path."
    )
    # Process 0 checks the path; every process raises its error.
    assert first["errors"] == {
        "orbax fails": "No space left on device",
        "read-only": read_only,
    }
    assert second["errors"]["read-only"] == read_only + " (on process 0)"
    header = first["header"]
    assert header["version"] == 3 and header["arrays"] in os.listdir(folder)
    # One process loads it, split over its own eight devices.
    like = _wide(7)
    before = _host(like)
    _check_loaded(eqx_norm.load(folder / "model.eqx", *like), like, first["second"])
    # A model of other shapes, a missing folder, a header naming a folder elsewhere
    # or Orbax missing: clear errors, the model untouched.
    wider = eqx.nn.Linear(5, 16, use_bias=False, key=jax.random.key(0))
    other = eqx.tree_at(lambda m: m.linear, like[0], wider)
    with pytest.raises(
        ValueError, match=r"structure: array 0 was saved as .*\[16, 4\].*\[16, 5\]"
    ):
        eqx_norm.load(folder / "model.eqx", other, like[1])
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"pip install 'eqx_norm\[distributed\]'"):
        eqx_norm.load(folder / "model.eqx", *like)
    monkeypatch.delitem(sys.modules, "orbax.checkpoint")
    moved = tmp_path / "elsewhere.eqx"
    moved.write_bytes((folder / "model.eqx").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"its arrays are in the folder .*copy"):
        eqx_norm.load(moved, *like)
    moved.write_text(json.dumps({**header, "arrays": "../" + header["arrays"]}))
    with pytest.raises(
        ValueError, match="`arrays` or `leaves` is missing or malformed"
    ):
        eqx_norm.load(moved, *like)
    np.testing.assert_equal(_host(like), before)


# --------------------------------------------------------------------------- faults

HEARTBEAT = 5  # seconds: `jax.distributed.initialize(heartbeat_timeout_seconds=...)`


def _die():
    note(killed_at=time.time())
    os.kill(os.getpid(), signal.SIGKILL)


def fault(args):
    """Save a checkpoint, then kill the victim process during a training step or
    during the next save; the survivor must not go on."""
    path = Path(args["folder"]) / "model.eqx"
    eqx_norm.save(path, *_wide(1))
    victim = jax.process_index() == args["victim"]
    if args["when"] == "during a step":
        model, state = _wide(1)
        grad = eqx.filter_grad(mse_loss, has_aux=True)
        step = eqx.filter_jit(lambda m, s, x, y: grad(m, s, x, y)[1])
        x, y = eqx_norm.shard_batch(
            (np.ones((32, 4), np.float32), np.zeros((32, 16), np.float32)), _mesh()
        )
        for t in range(10_000):
            if t == 3 and victim:
                _die()
            state = jax.block_until_ready(step(model, state, x, y))
    else:
        import orbax.checkpoint as ocp

        original = ocp.Checkpointer.save

        def save(self, *a, **kw):
            if victim and args["when"] == "inside a save":
                _die()  # before writing its part: the other is inside Orbax
            original(self, *a, **kw)
            if victim:
                _die()  # after writing the arrays, before the file names them

        ocp.Checkpointer.save = save
        eqx_norm.save(path, *_wide(2))
    note(finished=True)
    return {}


@pytest.mark.slow
@eight_devices
@pytest.mark.parametrize(
    "when, victim",
    [("during a step", 1), ("inside a save", 1), ("before the commit", 0)],
    ids=["step", "save", "commit"],
)
def test_a_killed_process_stops_the_others(when, victim, tmp_path):
    """A process killed during a step or a save: the other ends with JAX's error
    within about the heartbeat timeout, and the previous checkpoint loads."""
    folder = tmp_path / "shared"
    folder.mkdir()
    launched = launch(
        f"{__name__}:fault",
        {"folder": str(folder), "when": when, "victim": victim},
        heartbeat=HEARTBEAT,
        checked=False,
        timeout=90,
        folder=tmp_path,
    )
    dead, survivor = launched[victim], launched[1 - victim]
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-3000:]
    assert survivor.returncode == -signal.SIGABRT, survivor.stderr[-3000:]
    assert "finished" not in survivor.notes
    assert (
        "Terminating process because the JAX distributed service detected fatal "
        "errors" in survivor.stderr
    ), survivor.stderr[-3000:]
    seconds = survivor.ended - dead.notes["killed_at"]
    print(f"{when}, process {victim} killed: the other ended {seconds:.1f} s later")
    assert seconds < HEARTBEAT + 10
    # The previous checkpoint loads here, with the values first saved, and the next
    # save removes what the killed one left.
    like = _wide(7)
    _check_loaded(eqx_norm.load(folder / "model.eqx", *like), like, _wide(1))
    eqx_norm.save(folder / "model.eqx", *like)
    assert os.listdir(folder) == ["model.eqx"]


# -------------------------------------------------------------------------- example


def _example():
    """examples/multi_host.py as a module (it starts nothing when imported)."""
    spec = importlib.util.spec_from_file_location(
        "multi_host", ROOT / "examples" / "multi_host.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_multi_host_example_help_shows_every_flag_with_its_default():
    """`--help` gave no text for `--steps`, `--rho`, `--dataset` and `--checkpoint`
    and no default for any flag: now every flag it lists says what it is and its
    default. (The command imports no JAX before parsing: a tenth of a second.)"""
    text = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multi_host.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    usage, options = text.split("options:\n", 1)
    flags = dict(re.findall(r"\[(--[\w-]+) ?([A-Z_]*)\]", usage))
    assert {"--steps", "--rho", "--dataset", "--checkpoint"} <= flags.keys()
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", options)]
    for flag, metavar in flags.items():
        (entry,) = [e for e in entries if e.startswith(f"{flag} ")]
        described = entry.removeprefix(f"{flag} {metavar}").split("(default: ")
        assert len(described) == 2 and described[0].strip(), entry
    assert "(default: results/multi_host.eqx)" in " ".join(entries)


def test_multi_host_example_relays_all_but_gloo_connection_lines():
    """The example printed sixteen `[Gloo] Rank N is connected ...` lines from its
    processes before anything else; it now drops those, and only those, when it
    relays their output."""
    gloo = (
        b"[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected "
        b"peer ranks is : 7\n"
    )
    kept = [
        b"step    0  loss 2.3012\n",
        b"Traceback (most recent call last):\n",
        b"ValueError: Unknown data set 'bogus'.\n",
        b"a line that mentions [Gloo] Rank 3 is connected to 7 peer ranks\n",
        b"no newline at the end",
    ]
    target = io.BytesIO()
    _example().relay(io.BytesIO(gloo + kept[0] + gloo + b"".join(kept[1:])), target)
    assert target.getvalue() == b"".join(kept)


@pytest.mark.slow
@eight_devices
def test_multi_host_example_trains(tmp_path):
    """examples/multi_host.py --processes 2: each process reads its own rows, the
    model learns, and the checkpoint all of them saved loads here. It writes the
    checkpoint to `results/` under the working folder (not the working folder
    itself), and prints none of Gloo's connection lines."""
    path = tmp_path / "results" / "multi_host.eqx"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "multi_host.py"),
            "--processes=2",
            "--devices=2",
            "--steps=30",
            "--timeout=240",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes, 4 devices, 30 SAM steps" in out.stdout
    assert out.stdout.startswith("step    0  loss")
    assert "[Gloo]" not in out.stdout + out.stderr
    assert os.listdir(tmp_path) == ["results"]
    assert float(out.stdout.rsplit("test accuracy", 1)[1]) > 0.5
    from eqx_norm import experiments

    like = eqx.nn.make_with_state(experiments.CNN)("batch", key=jax.random.key(1))
    model, _ = eqx_norm.load(path, *like)
    assert not np.array_equal(model.conv.weight, like[0].conv.weight)
