import gzip
import hashlib
import http.server
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from eqx_norm import data

ROOT = Path(__file__).resolve().parent.parent
# OpenCV's digits.png: from EQX_NORM_DIGITS_PNG, else a data folder beside the checkout.
DIGITS_PNG = Path(
    os.environ.get(
        "EQX_NORM_DIGITS_PNG", ROOT.parent / "shared" / "data" / "digits.png"
    )
)
IN_CI = os.environ.get("CI") == "true"


def idx_header(code: int, shape: tuple[int, ...]) -> bytes:
    """The header of an IDX file of type `code` and `shape`, written byte by byte
    from the format's description (a shape can be any, for a file that lies)."""
    header = struct.pack(">BBBB", 0, 0, code, len(shape))
    return header + b"".join(struct.pack(">I", d) for d in shape)


def idx(array: np.ndarray, code: int) -> bytes:
    """An IDX file of `array`."""
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return idx_header(code, array.shape) + big_endian.tobytes()


@pytest.mark.parametrize(
    "dtype, code",
    [
        (np.uint8, 0x08),
        (np.int8, 0x09),
        (np.int16, 0x0B),
        (np.int32, 0x0C),
        (np.float32, 0x0D),
        (np.float64, 0x0E),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(dtype, code, compress, tmp_path):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(5, 4, 3)) * 50).astype(dtype)
    raw = idx(array, code)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = data.read_idx(path)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


def _write(
    folder: Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    codes: tuple[int, int] = (0x08, 0x08),
):
    """A data set's `split` in `folder`: the images gzipped, the labels raw, of
    the IDX type `codes` (uint8 by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx(images, codes[0]))
    )
    (folder / f"{split}-labels-idx1-ubyte").write_bytes(idx(labels, codes[1]))


def test_load_idx_dataset_gzip_and_raw(tmp_path):
    images = np.arange(6 * 28 * 28, dtype=np.uint32).reshape(6, 28, 28) % 256
    labels = np.array([3, 1, 4, 1, 5, 9], np.uint8)
    _write(tmp_path, "t10k", images.astype(np.uint8), labels)
    x, y = data.load_idx_dataset(tmp_path, "test")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    xf, yf = data.load_dataset("mnist", "test", folder=tmp_path)
    assert xf.shape == (6, 1, 28, 28) and xf.dtype == np.float32
    np.testing.assert_allclose(xf[:, 0], images / 255.0, rtol=1e-6)
    assert yf.dtype == np.int32


def _assert_refused(path: Path, content: bytes, message: str):
    """`read_idx` of a file holding `content` raises an `IDXError` that names the
    file and matches `message`, and leaves the file as it was."""
    path.write_bytes(content)
    with pytest.raises(data.IDXError, match=message) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content


def test_bad_idx_files_name_the_file_and_the_fault(tmp_path):
    good = idx(np.zeros((4, 2, 2), np.uint8), 0x08)
    cases = {
        "magic": (b"\x01\x02" + good[2:], "wrong magic number"),
        "truncated": (good[:-3], r"truncated.*shape \(4, 2, 2\)"),
        "trailing": (good + b"\x00", "trailing bytes"),
        "code": (good[:2] + b"\x07" + good[3:], "unknown IDX type code 0x07"),
        "header": (good[:9], "truncated inside its header"),
        "gzip": (gzip.compress(good)[:-10], "gzip stream is corrupt or truncated"),
    }
    for name, (content, message) in cases.items():
        _assert_refused(tmp_path / f"{name}-idx3-ubyte", content, message)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "0 bytes, too short"),
        (b"\x00\x00\x08", "3 bytes, too short"),
        (idx_header(0x08, (2, 2))[:6], "truncated inside its header"),
        (idx_header(0x08, (2**32 - 1,) * 3), "truncated"),
        (idx_header(0x0D, (2,)) + b"\x00" * 7, r"truncated.*8 bytes of data"),
        (idx_header(0x08, (2,)) + b"\x00" * 3, "has trailing bytes"),
        (gzip.compress(b"\x00\x00\x08\x01" + (1).to_bytes(4, "big"))[:-4], "gzip"),
        (b"\x1f\x8b" + b"\x00" * 20, "gzip stream is corrupt"),
        (idx_header(0x0A, (0,)) + b"\x00" * 4, "unknown IDX type code 0x0a"),
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
    _assert_refused(tmp_path / "bad-idx1-ubyte", content, message)


def test_idx_header_size_overflow_is_an_idx_error(tmp_path):
    """Regression: dimensions 2**31 x 2**31 x 4 made the byte count wrap to 0."""
    path = tmp_path / "huge-idx3-ubyte"
    content = idx_header(0x08, (2**31, 2**31, 4))
    _assert_refused(path, content, r"huge-idx3-ubyte: truncated.*2147483648")


def test_count_mismatch_and_missing_files(tmp_path):
    _write(tmp_path, "train", np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(data.IDXError, match="5 images .* but 4 labels"):
        data.load_idx_dataset(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        data.load_idx_dataset(tmp_path, "t10k")
    with pytest.raises(FileNotFoundError, match="download_missing=True"):
        data.load_dataset("mnist", "test", folder=tmp_path)
    with pytest.raises(ValueError, match="`split` must be"):
        data.load_idx_dataset(tmp_path, "valid")
    with pytest.raises(ValueError, match="Unknown data set 'cifar'"):
        data.load_dataset("cifar")


def test_load_dataset_refuses_images_that_are_not_8_bit(tmp_path):
    """Regression: int32 IDX images (values up to 1000) came back up to 3.92,
    although the docstring promises [0, 1]."""
    images = np.full((2, 28, 28), 1000, np.int32)
    _write(tmp_path, "train", images, np.array([1, 2], np.uint8), codes=(0x0C, 0x08))
    with pytest.raises(data.IDXError, match="stored as int32.*8-bit images"):
        data.load_dataset("mnist", folder=tmp_path)


@pytest.mark.parametrize(
    "labels, code, message",
    [
        (np.array([1, -2], np.int8), 0x09, "non-negative integers"),
        (np.array([1.0, 2.5], np.float32), 0x0D, "non-negative integers"),
    ],
    ids=["negative", "float"],
)
def test_load_dataset_refuses_bad_labels(labels, code, message, tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    _write(tmp_path, "train", images, labels, codes=(0x08, code))
    with pytest.raises(data.IDXError, match=message):
        data.load_dataset("mnist", folder=tmp_path)


def test_load_dataset_images_of_the_wrong_rank(tmp_path):
    _write(tmp_path, "train", np.zeros((2, 28 * 28), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(data.IDXError, match=r"expected \(N, H, W\) images"):
        data.load_dataset("mnist", folder=tmp_path)


def test_bundled_digits_are_a_stratified_disjoint_split():
    x, y = data.load_idx_dataset(data.DIGITS, "train")
    xt, yt = data.load_idx_dataset(data.DIGITS, "t10k")
    assert x.shape == (4000, 28, 28) and xt.shape == (1000, 28, 28)
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(yt), np.full(10, 100))
    # MNIST framing: a 4-pixel empty border around each 20x20 digit.
    for images in (x, xt):
        assert images[:, :4].max() == 0 and images[:, -4:].max() == 0
        assert images[:, :, :4].max() == 0 and images[:, :, -4:].max() == 0
    # No digit is in both splits, and none is repeated.
    keys = {hashlib.sha1(im.tobytes()).digest() for im in x}
    test_keys = {hashlib.sha1(im.tobytes()).digest() for im in xt}
    assert len(keys) == 4000 and len(test_keys) == 1000 and not keys & test_keys
    # Classes are shuffled, not stored in blocks.
    assert len(set(y[:100])) == 10


@pytest.mark.slow  # a subprocess
def test_bundled_digits_rebuild_byte_for_byte(tmp_path):
    """The shipped files are exactly what scripts/make_digits.py makes from
    OpenCV's digits.png, where that image is at hand."""
    if not DIGITS_PNG.exists():
        pytest.skip(f"the source image {DIGITS_PNG} is not beside this checkout")
    shipped = {p.name: p.read_bytes() for p in data.DIGITS.glob("*.gz")}
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_digits.py"),
            str(DIGITS_PNG),
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert sorted(p.name for p in tmp_path.glob("*.gz")) == sorted(shipped)
    for name, content in shipped.items():
        assert (tmp_path / name).read_bytes() == content, name
    # The script wrote where it was told, not over the shipped files.
    assert {p.name: p.read_bytes() for p in data.DIGITS.glob("*.gz")} == shipped


def test_fashion_mnist_known_facts():
    """The full Fashion-MNIST from Debian's dataset-fashion-mnist, through the
    loader: 60,000 + 10,000 images, 6,000 per class in train, pixel mean 0.2860 and
    std 0.3530 after scaling to [0, 1]."""
    if not data.FASHION_MNIST.exists():
        if IN_CI:
            pytest.fail("dataset-fashion-mnist is not installed; .ci/run installs it")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    x, y = data.load_dataset("fashion-mnist", "train")
    xt, yt = data.load_dataset("fashion-mnist", "test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(yt), np.full(10, 1000))
    assert round(float(x.mean(dtype=np.float64)), 4) == 0.2860
    assert round(float(x.std(dtype=np.float64)), 4) == 0.3530


# ------------------------------------------------------------ download


class _Server:
    """A file server on 127.0.0.1 for the test's own files; counts requests."""

    def __init__(self, files: dict[str, bytes], status: int = 200):
        self.files, self.status, self.requests = files, status, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                name = self.path.rsplit("/", 1)[-1]
                if outer.status != 200 or name not in outer.files:
                    self.send_error(outer.status if outer.status != 200 else 404)
                    return
                body = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _remotes(payloads: dict[str, bytes]) -> tuple[data.Remote, ...]:
    return tuple(
        data.Remote(name, len(b), hashlib.sha256(b).hexdigest())
        for name, b in payloads.items()
    )


def _mnist_like(n=7):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    return (
        {
            "t10k-images-idx3-ubyte.gz": gzip.compress(idx(images, 0x08)),
            "t10k-labels-idx1-ubyte.gz": gzip.compress(idx(labels, 0x08)),
        },
        images,
        labels,
    )


def test_download_good_files_then_cached(tmp_path):
    payloads, images, labels = _mnist_like()
    with _Server(payloads) as server:
        folder = data.download(
            tmp_path / "mnist", base_url=server.url, files=_remotes(payloads)
        )
        x, y = data.load_idx_dataset(folder, "t10k")
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, labels)
        assert len(server.requests) == 2
        data.download(folder, base_url=server.url, files=_remotes(payloads))
        assert len(server.requests) == 2  # checksums match: nothing fetched again
    assert sorted(p.name for p in folder.iterdir()) == sorted(payloads)


def test_download_truncated_or_wrong_file_leaves_nothing(tmp_path):
    payloads, _, _ = _mnist_like()
    expected = _remotes(payloads)
    truncated = {k: v[: len(v) // 2] for k, v in payloads.items()}
    corrupted = {k: bytes([v[0] ^ 1]) + v[1:] for k, v in payloads.items()}
    for served, message in ((truncated, "expected .* bytes"), (corrupted, "sha256")):
        folder = tmp_path / message.split()[0]
        with (
            _Server(served) as server,
            pytest.raises(data.DownloadError, match=message),
        ):
            data.download(folder, base_url=server.url, files=expected)
        assert list(folder.iterdir()) == []  # no final file and no temporary file


@pytest.mark.parametrize("status", [404, 500])
def test_download_server_error_leaves_nothing(status, tmp_path):
    payloads, _, _ = _mnist_like()
    with _Server(payloads, status=status) as server:
        with pytest.raises(data.DownloadError, match=rf"127\.0\.0\.1.*{status}"):
            data.download(tmp_path, base_url=server.url, files=_remotes(payloads))
    assert list(tmp_path.iterdir()) == []


def test_download_replaces_a_bad_cached_file(tmp_path):
    payloads, images, _ = _mnist_like()
    name = "t10k-images-idx3-ubyte.gz"
    (tmp_path / name).write_bytes(b"not the file")
    with _Server(payloads) as server:
        data.download(tmp_path, base_url=server.url, files=_remotes(payloads))
    np.testing.assert_array_equal(data.read_idx(tmp_path / name), images)


def test_idx_shape_with_a_zero_and_a_huge_dimension_is_an_idx_error(tmp_path):
    """Regression (found by the fuzz test): dimensions (2, 0, 2**30) hold no data,
    so the byte count matched, and NumPy's reshape raised a bare `ValueError`
    ("array is too big")."""
    path = tmp_path / "empty-idx3-ubyte"
    content = idx_header(0x0D, (2, 0, 2**31 - 1, 2**31 - 1))
    _assert_refused(path, content, r"empty-idx3-ubyte: .*more than an array can hold")
