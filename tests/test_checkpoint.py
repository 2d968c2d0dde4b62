"""`eqx_norm.save` and `eqx_norm.load` given what goes wrong: a save that fails
part-way keeps the previous file, and a malformed, truncated or missing file is
refused by name with the model and the file unchanged. (The round trip and the
mismatch messages are in `test_tools.py`.)"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import pytest

import eqx_norm

from .helpers import MLP, assert_same, leaves, trained_mlp

ROOT = Path(__file__).resolve().parent.parent


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
