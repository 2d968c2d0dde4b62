"""Build the bundled digits (eqx_norm/data/digits/) from OpenCV's digits.png.

    python scripts/make_digits.py path/to/digits.png

digits.png holds 5,000 real MNIST digits, 20x20 each, 50 rows of 100, label =
row // 5 (see eqx_norm/data/digits/README.md for provenance and licence). Each digit
is padded by 4 pixels to MNIST's 28x28 frame, then split, stratified by class with a
fixed seed, into 400 training and 100 test images per class, and written as gzipped
IDX files, byte-for-byte reproducible.
"""

import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np
from matplotlib import image

SHA256 = "60c917758ef97cc090f35cd8e293e4de691ef942847da0ff80dedab33d57c662"
OUT = Path(__file__).resolve().parent.parent / "eqx_norm" / "data" / "digits"
SEED = 20261124
TEST_PER_CLASS = 100


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def main(png: str, out: Path = OUT) -> None:
    data = Path(png).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        sys.exit(f"{png}: sha256 {digest}, expected {SHA256}")
    pixels = image.imread(png)  # float in [0, 1], shape (1000, 2000)
    pixels = np.rint(pixels * 255).astype(np.uint8)
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    assert pixels.shape == (1000, 2000), pixels.shape
    digits = pixels.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    labels = np.repeat(np.arange(50) // 5, 100).astype(np.uint8)
    images = np.pad(digits, ((0, 0), (4, 4), (4, 4)))
    rng = np.random.default_rng(SEED)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:TEST_PER_CLASS])
        train.append(idx[TEST_PER_CLASS:])
    for split, parts in (("train", train), ("t10k", test)):
        order = rng.permutation(np.concatenate(parts))
        for kind, array in (
            ("images-idx3", images[order]),
            ("labels-idx1", labels[order]),
        ):
            path = out / f"{split}-{kind}-ubyte.gz"
            with (
                open(path, "wb") as f,
                gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz,
            ):
                gz.write(idx_bytes(array))
            print(path, path.stat().st_size)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python scripts/make_digits.py path/to/digits.png [OUT_DIR]")
    main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) == 3 else OUT)
