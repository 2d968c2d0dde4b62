import gzip
import io
import math
import zlib
from pathlib import Path

import numpy as np

# IDX type codes and the (big-endian) NumPy dtypes they stand for.
_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXError(ValueError):
    """A file is not a valid IDX file, or a data set's files do not match."""


_BLOCK = 1 << 20


def _read_at_most(stream: io.BufferedIOBase, size: int) -> bytes:
    """Up to `size` bytes, read in blocks, so that a header claiming a huge size
    costs no more memory than the file really holds."""
    blocks = []
    left = size
    while left > 0:
        block = stream.read(min(left, _BLOCK))
        if not block:
            break
        blocks.append(block)
        left -= len(block)
    return b"".join(blocks)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the format of MNIST and Fashion-MNIST), gzipped or raw.

    ```python
    from eqx_norm import data

    labels = data.read_idx(data.DIGITS / "t10k-labels-idx1-ubyte.gz")  # (1000,) uint8
    ```

    **Arguments:**

    - `path`: the file, e.g. `train-images-idx3-ubyte.gz`. Gzip is detected from the
        content, not the name.

    **Returns:**

    A NumPy array with the file's shape, in native byte order.

    **Raises:**

    An [`eqx_norm.data.IDXError`][] naming the file for a corrupt gzip stream, a
    wrong magic number, an unknown type code, or a file that is shorter or longer
    than its header says. The size the header claims is checked against the data
    before anything of that size is allocated.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw) if compressed else raw
        try:
            return _parse(path, stream)
        except (EOFError, OSError, zlib.error) as e:
            raise IDXError(
                f"{path}: the gzip stream is corrupt or truncated ({e}). Delete the "
                "file and download it again."
            ) from None


def _parse(path: Path, stream: io.BufferedIOBase) -> np.ndarray:
    head = _read_at_most(stream, 4)
    if len(head) < 4:
        raise IDXError(f"{path}: {len(head)} bytes, too short for an IDX header.")
    if head[0] != 0 or head[1] != 0:
        raise IDXError(
            f"{path}: wrong magic number 0x{head.hex()}; an IDX file starts with "
            "two zero bytes, a type code and the number of dimensions (e.g. "
            "0x00000803 for images). Is this really an IDX file?"
        )
    code, ndim = head[2], head[3]
    if code not in _DTYPES:
        raise IDXError(f"{path}: unknown IDX type code 0x{code:02x}.")
    dims = _read_at_most(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise IDXError(f"{path}: truncated inside its header ({4 + len(dims)} bytes).")
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    dtype = _DTYPES[code]
    # Python integers: a product of 32-bit sizes can pass any fixed-width type.
    expected = math.prod(shape) * dtype.itemsize
    data = _read_at_most(stream, expected + 1)
    if len(data) != expected:
        if len(data) < expected:
            what, found = "truncated", f"{len(data)} bytes"
        else:
            what, found = "has trailing bytes", "more"
        raise IDXError(
            f"{path}: {what}: its header says shape {shape} ({expected} bytes of "
            f"data), but it holds {found}."
        )
    if math.prod(d for d in shape if d) * dtype.itemsize > np.iinfo(np.intp).max:
        # Even with no data (a zero dimension), NumPy cannot make an array of it.
        raise IDXError(
            f"{path}: its header says shape {shape}, more than an array can hold."
        )
    array = np.frombuffer(data, dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder}: no {stem}.gz (or {stem}). An MNIST-format folder holds "
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
    )


def load_idx_dataset(
    folder: str | Path, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of an MNIST-format data set from a folder.

    ```python
    from eqx_norm import data

    images, labels = data.load_idx_dataset(data.DIGITS, "test")
    # uint8 arrays of shapes (1000, 28, 28) and (1000,)
    ```

    **Arguments:**

    - `folder`: a folder holding `{split}-images-idx3-ubyte[.gz]` and
        `{split}-labels-idx1-ubyte[.gz]` (MNIST, Fashion-MNIST, KMNIST, ...).
    - `split`: `"train"` or `"t10k"` (`"test"` is taken as `"t10k"`).

    **Returns:**

    A 2-tuple `(images, labels)`: uint8 arrays of shapes `(N, H, W)` and `(N,)`.

    **Raises:**

    `FileNotFoundError` if a file is missing; [`eqx_norm.data.IDXError`][] if a file
    is invalid or the images and labels do not match in number.
    """
    split = {"test": "t10k"}.get(split, split)
    if split not in ("train", "t10k"):
        raise ValueError(
            f"`split` must be 'train' or 't10k' (or 'test'), got {split!r}."
        )
    folder = Path(folder)
    images_path = _find(folder, f"{split}-images-idx3-ubyte")
    labels_path = _find(folder, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise IDXError(f"{images_path}: expected (N, H, W) images, got {images.shape}.")
    if labels.ndim != 1:
        raise IDXError(f"{labels_path}: expected (N,) labels, got {labels.shape}.")
    if len(images) != len(labels):
        raise IDXError(
            f"{folder}: {len(images)} images in {images_path.name} but "
            f"{len(labels)} labels in {labels_path.name}."
        )
    return images, labels
