"""Property-based fuzzing of the two parsers of untrusted bytes: `eqx_norm.load` on
checkpoint files and `eqx_norm.data.read_idx` on IDX files, random and mutated.

Only the documented error types may escape, a successful read returns what the
format promises, and the file on disk is never changed. Derandomised in CI.
"""

import functools
import gzip
import os
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import eqx_norm
from eqx_norm import data

from ..helpers import MLP, apply

SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)),
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """`original` with a few flipped, inserted or deleted bytes, or cut short."""
    content = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(content) - 1, 0)))
        if kind == "flip" and content:
            content[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            content[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del content[at : at + draw(st.integers(1, 8))]
        else:
            del content[at:]
    return bytes(content)


def _read_back(content: bytes, read):
    """Write `content` to a fresh file, `read` it, and check the file is unchanged."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file"
        path.write_bytes(content)
        try:
            return read(path)
        finally:
            assert path.read_bytes() == content
            assert os.listdir(folder) == ["file"]


# ------------------------------------------------------------------ checkpoints


@functools.cache
def _checkpoint() -> bytes:
    model, state = eqx.nn.make_with_state(MLP)()
    for k in jax.random.split(jax.random.key(0), 2):
        _, state = apply(model, 3 + jax.random.normal(k, (8, 4)), state)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.eqx"
        eqx_norm.save(path, model, state)
        return path.read_bytes()


def _load(path: Path):
    like = eqx.nn.make_with_state(MLP)()
    before = [np.asarray(a) for a in jax.tree.leaves(like)]
    try:
        loaded = eqx_norm.load(path, *like)
    except ValueError:
        loaded = None
    for a, b in zip(jax.tree.leaves(like), before, strict=True):
        np.testing.assert_array_equal(a, b)  # the structure given is untouched
    if loaded is not None:
        assert jax.tree.structure(loaded) == jax.tree.structure(like)
        for a, b in zip(jax.tree.leaves(loaded), before, strict=True):
            a = np.asarray(a)
            assert a.shape == b.shape and a.dtype == b.dtype
    return loaded


@SETTINGS
@given(st.binary(max_size=4096))
def test_load_random_bytes_only_raises_value_error(content):
    assert _read_back(content, _load) is None


@SETTINGS
@given(st.data())
def test_load_mutated_checkpoints_only_raises_value_error(draw):
    _read_back(draw.draw(mutated(_checkpoint())), _load)


def test_load_of_the_unmutated_checkpoint_succeeds():
    """The fuzzing above starts from a file that loads."""
    assert _read_back(_checkpoint(), _load) is not None


# ---------------------------------------------------------------------- IDX files


def _idx(array: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, array.ndim])
    head += b"".join(d.to_bytes(4, "big") for d in array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


_GOOD_IDX = {
    "uint8": _idx(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08),
    "float32": _idx(np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2), 0x0D),
    "int16": _idx(np.arange(5, dtype=np.int16), 0x0B),
}


def _read_idx(path: Path):
    try:
        array = data.read_idx(path)
    except data.IDXError:
        return None
    assert isinstance(array, np.ndarray) and array.dtype.isnative
    return array


@SETTINGS
@given(st.binary(max_size=512))
def test_read_idx_random_bytes_only_raises_idx_error(content):
    _read_back(content, _read_idx)


@SETTINGS
@given(st.data(), st.sampled_from(sorted(_GOOD_IDX)), st.booleans())
def test_read_idx_mutated_files_only_raises_idx_error(draw, kind, compress):
    good = _GOOD_IDX[kind]
    original = gzip.compress(good, mtime=0) if compress else good
    content = draw.draw(mutated(original))
    array = _read_back(content, _read_idx)
    if array is not None and not compress:
        assert array.nbytes == len(content) - 4 - 4 * array.ndim


@SETTINGS
@given(
    st.integers(0, 255),
    st.lists(st.integers(0, 2**32 - 1), max_size=6),
    st.binary(max_size=64),
)
def test_read_idx_any_header_only_raises_idx_error(code, shape, payload):
    """Any type code and any dimensions, however large their product, with a short
    payload: an `IDXError` (or the array the header describes), never a crash or a
    huge allocation."""
    head = bytes([0, 0, code, len(shape)])
    head += b"".join(d.to_bytes(4, "big") for d in shape)
    array = _read_back(head + payload, _read_idx)
    if array is not None:
        assert array.shape == tuple(shape)
