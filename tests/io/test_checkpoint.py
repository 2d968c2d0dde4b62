"""`eqx_norm.save` and `eqx_norm.load`: the round trip, the mismatches they refuse
by name, and what goes wrong: a save that fails part-way keeps the previous file,
and a malformed, truncated or missing file is refused by name with the model and
the file unchanged. (Several processes: `test_multihost.py`.)"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_norm

from ..helpers import (
    MLP,
    Net,
    as_a_user_calls_it,
    assert_same,
    bn_at,
    leaves,
    stored,
    trained_mlp,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess
def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    """Regression: a save that fails part-way (here: a file-size limit smaller
    than the checkpoint, as a disk filling up) left a truncated file in place of
    the good one. Now the previous file is intact and no temporary file remains."""
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
        cwd=str(ROOT),
        timeout=120,
    )
    assert "save failed" in out.stdout, out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["model.eqx"]
    model, state = eqx.nn.make_with_state(MLP)()
    like = eqx.nn.make_with_state(MLP)(key=jax.random.key(3))
    assert_same(eqx_norm.load(path, *like), (model, state))


def test_save_failing_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    model, state = trained_mlp()
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
    """Regression: a header without `layers` gave `KeyError: 'layers'`, and one of
    version 99 loaded silently."""
    content, message = _header_variants()[case]
    path = tmp_path / "bad.eqx"
    path.write_bytes(content + b"\n")
    model, state = eqx.nn.make_with_state(MLP)()
    before = leaves((model, state))
    with pytest.raises(ValueError, match=f"bad.eqx: not a checkpoint.*{message}"):
        eqx_norm.load(path, model, state)
    assert_same((model, state), before)
    assert path.read_bytes() == content + b"\n"


def test_load_of_a_truncated_checkpoint_names_the_file(tmp_path):
    model, state = trained_mlp()
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    content = path.read_bytes()
    for cut in (len(content) - 5, content.index(b"\n") + 1, len(content) // 2):
        path.write_bytes(content[:cut])
        like = eqx.nn.make_with_state(MLP)()
        before = leaves(like)
        with pytest.raises(ValueError, match="model.eqx: does not match"):
            eqx_norm.load(path, *like)
        assert_same(like, before)


def test_load_of_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        eqx_norm.load(tmp_path / "nothing.eqx", *eqx.nn.make_with_state(MLP)())


def test_checkpoint_compares_approaches_by_value(tmp_path):
    """`Renorm()` equals `Renorm(r_max=3)` but their reprs differ: a checkpoint
    compared by repr refused to load into an equal model. A version-1 file (which
    stored reprs) still loads."""
    model, state = trained_mlp(eqx_norm.Renorm())
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    same = eqx.nn.make_with_state(MLP)(eqx_norm.Renorm(r_max=3))
    assert_same(eqx_norm.load(path, *same), (model, state))
    message = r'approach "renorm".*eqx_norm\.Renorm\(r_max=4'
    with pytest.raises(ValueError, match=message):
        eqx_norm.load(path, *eqx.nn.make_with_state(MLP)(eqx_norm.Renorm(r_max=4)))
    header, rest = path.read_bytes().split(b"\n", 1)
    old = json.loads(header)
    old["version"] = 1
    for layer in old["layers"]:
        layer["approach"] = layer.pop("approach_repr")
    path.write_bytes(json.dumps(old).encode() + b"\n" + rest)
    like = eqx.nn.make_with_state(MLP)(eqx_norm.Renorm())
    assert_same(eqx_norm.load(path, *like), (model, state))


def test_checkpoint_round_trip_and_mismatches(tmp_path, getkey):
    model, state = trained_mlp()
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    like_model, like_state = eqx.nn.make_with_state(MLP)(key=getkey())
    loaded_model, loaded_state = eqx_norm.load(path, like_model, like_state)
    for a, b in zip(
        jax.tree.leaves((loaded_model, loaded_state)), jax.tree.leaves((model, state))
    ):
        np.testing.assert_array_equal(a, b)

    other, other_state = eqx.nn.make_with_state(MLP)("running")
    before = [np.asarray(a) for a in jax.tree.leaves((other, other_state))]
    with pytest.raises(
        ValueError,
        match=r"at '\.layers\.layers\[1\]' was saved with "
        r'approach "batch".*set_approach\(model, "batch"\)',
    ):
        eqx_norm.load(path, other, other_state)
    assert_same((other, other_state), before)

    def mlp_with(index, layer):
        """A fresh MLP, and its state, with `layer` in place of layer `index`."""

        class Changed(MLP):
            def __init__(self):
                super().__init__()
                self.layers = eqx.tree_at(lambda s: s.layers[index], self.layers, layer)

        return eqx.nn.make_with_state(Changed)()

    wide, wide_state = mlp_with(4, eqx_norm.BatchNorm(7, "batch", momentum=0.9))
    with pytest.raises(
        ValueError, match=r"layers\[4\]' was saved with input_size=5.*input_size=7"
    ):
        eqx_norm.load(path, wide, wide_state)

    half, half_state = mlp_with(
        1, eqx_norm.BatchNorm(6, "batch", momentum=0.9, dtype=jnp.float16)
    )
    with pytest.raises(
        ValueError, match="parameter_dtype='float32'.*parameter_dtype='float16'"
    ):
        eqx_norm.load(path, half, half_state)
    junk = tmp_path / "junk.eqx"
    eqx.tree_serialise_leaves(junk, (model, state))
    with pytest.raises(ValueError, match="not a checkpoint written by `eqx_norm.save`"):
        eqx_norm.load(junk, model, state)


class _Halves(eqx_norm.Approach):
    """A user's own approach (the README's), for checkpoint messages."""

    def train(self, batch, running, momentum, eps):
        new = eqx_norm.RunningStats(batch.mean, batch.var, running.counter + 1)
        return batch.mean, batch.var, new


@pytest.mark.parametrize(
    "saved, model_approach, message",
    [
        ("batch", "ema", r'approach "batch", but this model has approach "ema"'),
        (
            eqx_norm.Renorm(),
            eqx_norm.Renorm(r_max=4),
            r'approach "renorm", but this model has approach '
            r"eqx_norm\.Renorm\(r_max=4\)",
        ),
        (
            eqx_norm.Running(max_count=9),
            "batch",
            r"approach eqx_norm\.Running\(max_count=9\), but this model has "
            r'approach "batch".*set_approach\(model, eqx_norm\.Running\(max_count=9\)',
        ),
        (
            _Halves(),
            "frozen",
            r'approach _Halves, but this model has approach "frozen".*'
            r"set_approach\(model, _Halves\(\)\)",
        ),
    ],
    ids=["names", "non-default", "built-in-object", "own-class"],
)
def test_checkpoint_approach_mismatch_names_approaches_as_written(
    saved, model_approach, message, tmp_path
):
    """It said `approach='Batch()'` (a repr no user writes) and offered two fixes;
    the one it now gives is checked to work."""
    model, state = trained_mlp(saved)
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    like, like_state = eqx.nn.make_with_state(MLP)(
        model_approach, key=jax.random.key(2)
    )
    before = leaves((like, like_state))
    with pytest.raises(ValueError, match=message + r".*; the state stays valid\.$"):
        eqx_norm.load(path, like, like_state)
    assert_same((like, like_state), before)
    like = eqx_norm.set_approach(like, saved)
    assert_same(eqx_norm.load(path, like, like_state), leaves((model, state)))


def test_checkpoint_approach_mismatch_in_some_layers_says_where(tmp_path):
    model, state = eqx.nn.make_with_state(MLP)()
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    like, like_state = eqx.nn.make_with_state(MLP)()
    like = eqx_norm.set_approach(like, "ema", where=lambda bn: bn.input_size == 5)
    with pytest.raises(
        ValueError, match=r'set_approach\(model, "batch", where=\.\.\.\)`.*`where=`'
    ):
        eqx_norm.load(path, like, like_state)


def test_save_refuses_to_replace_a_read_only_file(tmp_path):
    """The rename replaced a read-only file (as root, or in a writable folder)."""
    path = tmp_path / "model.eqx"
    path.write_bytes(b"keep me")
    path.chmod(0o444)
    with pytest.raises(PermissionError, match=r"model\.eqx' is read-only"):
        eqx_norm.save(path, *eqx.nn.make_with_state(MLP)())
    assert path.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["model.eqx"]


def test_save_keeps_the_permissions_of_the_file(tmp_path):
    """The temporary file's 0o600 replaced the file's permissions, and a new file
    was readable by its owner only."""
    model, state = eqx.nn.make_with_state(MLP)()
    old = tmp_path / "old.eqx"
    old.write_bytes(b"")
    old.chmod(0o640)
    eqx_norm.save(old, model, state)
    assert old.stat().st_mode & 0o777 == 0o640
    new = tmp_path / "new.eqx"
    eqx_norm.save(new, model, state)
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "where, error, message",
    [
        (
            "missing/model.eqx",
            FileNotFoundError,
            r"the folder '.*missing' of .*"
            r"does not exist; create it first",
        ),
        ("folder", IsADirectoryError, r"folder' is a folder; pass a file path"),
    ],
    ids=["missing-folder", "a-folder"],
)
def test_save_to_a_bad_path_names_the_path(where, error, message, tmp_path):
    """The errors named the hidden temporary file, not the path given."""
    (tmp_path / "folder").mkdir()
    with pytest.raises(error, match=message):
        eqx_norm.save(tmp_path / where, *eqx.nn.make_with_state(MLP)())
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["folder"]


def test_load_of_a_file_that_is_not_a_checkpoint(tmp_path):
    """Binary bytes, and a folder (the malformed headers are above)."""
    content = b"\x00\xff" * 100
    path = tmp_path / "other.eqx"
    path.write_bytes(content)
    model, state = eqx.nn.make_with_state(MLP)()
    before = leaves((model, state))
    with pytest.raises(ValueError, match=r"other\.eqx: not a checkpoint written by"):
        eqx_norm.load(path, model, state)
    assert_same((model, state), before)
    assert path.read_bytes() == content
    with pytest.raises(IsADirectoryError):
        eqx_norm.load(tmp_path, model, state)


def test_checkpoint_of_a_folded_model_and_of_non_finite_statistics(tmp_path):
    """A model without BatchNorm (a folded one) saves and loads, and NaN and inf
    statistics come back as they were, bit for bit."""
    model, state = trained_mlp()
    bn = bn_at(model, 1)
    stats = stored(state, bn.state_index)
    state = state.set(
        bn.state_index,
        stats._replace(mean=stats.mean.at[0].set(jnp.nan).at[1].set(-jnp.inf)),
    )
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    loaded = eqx_norm.load(path, *eqx.nn.make_with_state(MLP)())
    assert_same(loaded, leaves((model, state)))
    folded = eqx.nn.Sequential([eqx.nn.Linear(4, 2, key=jax.random.key(4))])
    empty = eqx.nn.make_with_state(eqx.nn.Identity)()[1]
    eqx_norm.save(path, folded, empty)
    skeleton = eqx.nn.Sequential([eqx.nn.Linear(4, 2, key=jax.random.key(5))])
    assert_same(eqx_norm.load(path, skeleton, empty), leaves(folded))


def test_load_puts_every_array_back_with_its_sharding(tmp_path):
    """Regression: on one process of several devices `load` returned every array on
    the default device, while the scaling guide says each comes back with the
    sharding of the array it replaces (as it did across processes)."""
    model, state = trained_mlp()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    model, state = eqx_norm.replicate((model, state), mesh)
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    loaded = eqx_norm.load(path, model, state)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves((model, state))):
        if isinstance(b, jax.Array):
            assert a.sharding == b.sharding
            np.testing.assert_array_equal(a, b)
    # Loaded into a model on one device, it comes back on that device.
    fresh = eqx.nn.make_with_state(MLP)()
    one = eqx_norm.load(path, *fresh)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(fresh)):
        if isinstance(b, jax.Array):
            assert a.sharding == b.sharding


def test_save_through_a_symlink_writes_its_target(tmp_path):
    """Regression: `save("latest.eqx", ...)` with `latest.eqx -> step100.eqx` replaced
    the link by a file and left the target stale. The target is written (in its
    own folder) and the link stays."""
    model, state = trained_mlp()
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "step100.eqx"
    eqx_norm.save(target, *eqx.nn.make_with_state(MLP)())
    link = tmp_path / "latest.eqx"
    link.symlink_to(Path("runs") / "step100.eqx")
    eqx_norm.save(link, model, state)
    assert link.is_symlink() and os.readlink(link) == str(Path("runs") / "step100.eqx")
    loaded = eqx_norm.load(target, *eqx.nn.make_with_state(MLP)())
    for a, b in zip(leaves(loaded), leaves((model, state))):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["step100.eqx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.eqx", "runs"]


# ------------------------------------------------------------------ bad input


class _WiderOut(MLP):
    def __init__(self):
        super().__init__()
        last = eqx.nn.Linear(5, 3, key=jax.random.key(4))
        self.layers = eqx.tree_at(lambda s: s.layers[6], self.layers, last)


class _HalfOut(MLP):
    def __init__(self):
        super().__init__()
        half = jnp.zeros((2, 5), jnp.float16)
        self.layers = eqx.tree_at(lambda s: s.layers[6].weight, self.layers, half)


class _ExtraArray(MLP):
    extra: jax.Array

    def __init__(self):
        super().__init__()
        self.extra = jnp.ones(3)


class _OneNorm(eqx.Module):
    """The MLP's first three layers: one BatchNorm where the file has two."""

    layers: eqx.nn.Sequential

    def __init__(self):
        self.layers = eqx.nn.Sequential(list(MLP().layers.layers[:3]))

    def __call__(self, x, state):
        return self.layers(x, state)


@pytest.mark.parametrize(
    "like, message",
    [
        (
            _WiderOut,
            r"model\.eqx: does not match this model's structure: .*changed shape "
            r"from \(3, 5\) in `like` to \(2, 5\) on disk",
        ),
        (
            _HalfOut,
            r"model\.eqx: does not match this model's structure: .*changed dtype "
            r"from float16 in `like` to float32 on disk",
        ),
        (_ExtraArray, r"model\.eqx: does not match this model's structure"),
        (
            _OneNorm,
            r"model\.eqx: the saved model has BatchNorm layers at "
            r"\['\.layers\.layers\[1\]', '\.layers\.layers\[4\]'\], this model at "
            r"\['\.layers\.layers\[1\]'\]",
        ),
    ],
    ids=["wider-last-layer", "float16-last-layer", "an-extra-array", "one-batch-norm"],
)
def test_load_into_a_model_of_another_structure_names_the_file(like, message, tmp_path):
    """Models that differ from the saved one outside its BatchNorms (or in how
    many it has) are refused naming the file and the difference; the model, the
    state and the file are unchanged."""
    model, state = trained_mlp()
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    content = path.read_bytes()
    other, other_state = eqx.nn.make_with_state(like)()
    before = leaves((other, other_state))
    with pytest.raises(ValueError, match=message):
        eqx_norm.load(path, other, other_state)
    assert_same((other, other_state), before)
    assert path.read_bytes() == content


def test_save_to_an_empty_path_names_the_folder(tmp_path, monkeypatch):
    """`""` is the current folder: refused as a folder, and nothing is written
    there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        IsADirectoryError, match=r"`eqx_norm\.save`: '\.' is a folder; pass a file"
    ):
        eqx_norm.save("", *eqx.nn.make_with_state(MLP)())
    assert list(tmp_path.iterdir()) == []


def test_save_through_a_link_to_a_folder_names_the_folder(tmp_path):
    """A link `latest.eqx` to a run's folder: the folder it points to is named,
    and the link and the folder are left as they were."""
    (tmp_path / "run").mkdir()
    link = tmp_path / "latest.eqx"
    link.symlink_to("run")
    with pytest.raises(IsADirectoryError, match=r"run' is a folder; pass a file path"):
        eqx_norm.save(link, *eqx.nn.make_with_state(MLP)())
    assert link.is_symlink() and os.readlink(link) == "run"
    assert list((tmp_path / "run").iterdir()) == []


def test_load_through_a_link_whose_file_is_gone_names_the_link(tmp_path):
    model, state = eqx.nn.make_with_state(MLP)()
    link = tmp_path / "latest.eqx"
    link.symlink_to("step100.eqx")  # deleted by a clean-up, say
    before = leaves((model, state))
    with pytest.raises(FileNotFoundError, match=r"latest\.eqx"):
        eqx_norm.load(link, model, state)
    assert_same((model, state), before)
    assert link.is_symlink()


@pytest.mark.parametrize("tool", ["save", "load"])
def test_a_path_that_is_none_is_named(tool, tmp_path):
    model, state = eqx.nn.make_with_state(MLP)()
    before = leaves((model, state))
    with (
        as_a_user_calls_it(),
        pytest.raises(TypeError, match=rf"`eqx_norm\.{tool}`: `path`"),
    ):
        getattr(eqx_norm, tool)(None, model, state)
    assert_same((model, state), before)


def test_save_into_a_file_as_if_a_folder_says_it_is_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    with pytest.raises(NotADirectoryError, match=r"notes\.txt' is a file"):
        eqx_norm.save(notes / "model.eqx", *eqx.nn.make_with_state(MLP)())
    assert notes.read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _not_the_state(case, model, state):
    """The `(model, state)` arguments of a call given something else for the
    state."""
    if case == "state-none":
        return model, None
    if case == "state-of-another-model":
        return model, eqx.nn.make_with_state(Net)(jax.random.key(0))[1]
    return state, model  # swapped


@pytest.mark.parametrize("tool", ["save", "load"])
@pytest.mark.parametrize(
    "case", ["state-none", "state-of-another-model", "model-and-state-swapped"]
)
def test_a_state_that_is_not_the_models_is_named(tool, case, tmp_path):
    model, state = trained_mlp()
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    content = path.read_bytes()
    first, second = _not_the_state(case, model, state)
    before = leaves((model, state))
    with (
        as_a_user_calls_it(),
        pytest.raises((TypeError, ValueError), match=r"`state`.*eqx\.nn\.State"),
    ):
        getattr(eqx_norm, tool)(path, first, second)
    assert_same((model, state), before)
    assert path.read_bytes() == content


@pytest.mark.parametrize("tool", ["save", "load"])
def test_save_and_load_under_jit_say_to_call_them_outside(tool, tmp_path):
    model, state = trained_mlp()
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    content = path.read_bytes()
    before = leaves((model, state))
    call = eqx.filter_jit(lambda m, s: getattr(eqx_norm, tool)(path, m, s))
    with pytest.raises(TypeError, match=rf"`eqx_norm\.{tool}`.*outside.*jit"):
        call(model, state)
    assert_same((model, state), before)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["model.eqx"]


@pytest.mark.parametrize(
    "tail", [b"garbage", "itself"], ids=["garbage-appended", "concatenated-twice"]
)
def test_load_refuses_bytes_after_the_last_leaf(tail, tmp_path):
    model, state = trained_mlp()
    path = tmp_path / "model.eqx"
    eqx_norm.save(path, model, state)
    content = path.read_bytes()
    content += content if tail == "itself" else tail
    path.write_bytes(content)
    like = eqx.nn.make_with_state(MLP)()
    before = leaves(like)
    with pytest.raises(ValueError, match=r"model\.eqx: .*after"):
        eqx_norm.load(path, *like)
    assert_same(like, before)
    assert path.read_bytes() == content


def test_the_layout_flag_is_not_in_the_file(tmp_path):
    """`compute_channels_last` became an ordinary field (so that `eqx.tree_at`
    switches it), a leaf of the model: a checkpoint leaves it out, so that files
    written before load as they did, byte for byte the same format, and `load` keeps
    the flag of the model it is given."""
    model, state = trained_mlp()
    moved = eqx_norm.set_compute_channels_last(model)
    eqx_norm.save(tmp_path / "a.eqx", model, state)
    eqx_norm.save(tmp_path / "b.eqx", moved, state)
    assert (tmp_path / "a.eqx").read_bytes() == (tmp_path / "b.eqx").read_bytes()
    loaded, _ = eqx_norm.load(tmp_path / "a.eqx", moved, state)
    assert all(bn.compute_channels_last for _, bn in eqx_norm.batch_norms(loaded))
    loaded, _ = eqx_norm.load(tmp_path / "b.eqx", model, state)
    assert not any(bn.compute_channels_last for _, bn in eqx_norm.batch_norms(loaded))
