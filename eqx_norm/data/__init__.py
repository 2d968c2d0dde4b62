"""MNIST-format data: an IDX reader, a checksummed download, and real handwritten
digits shipped with the package, for the experiments."""

from pathlib import Path

import numpy as np

from ._download import (
    MNIST_FILES as MNIST_FILES,
    MNIST_URL as MNIST_URL,
    DownloadError as DownloadError,
    Remote as Remote,
    default_cache as default_cache,
    download as download,
)
from ._idx import (
    IDXError as IDXError,
    load_idx_dataset as load_idx_dataset,
    read_idx as read_idx,
)

DIGITS = Path(__file__).parent / "digits"
"""The bundled digits: 5,000 real MNIST digits (4,000 train, 1,000 test), see its
README.md for provenance."""

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's `dataset-fashion-mnist` package puts Fashion-MNIST."""

DATASETS = ("digits", "mnist", "fashion-mnist")
"""The names [`eqx_norm.data.load_dataset`][] reads: `"digits"` (bundled, see
[`eqx_norm.data.DIGITS`][]), `"mnist"` (downloaded, see
[`eqx_norm.data.download`][]) and `"fashion-mnist"` (Debian's package, see
[`eqx_norm.data.FASHION_MNIST`][])."""


def load_dataset(
    name: str = "digits",
    split: str = "train",
    *,
    folder: str | Path | None = None,
    download_missing: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a data set as float32 images in [0, 1] of shape `(N, 1, 28, 28)` and
    int32 labels.

    ```python
    from eqx_norm import data

    images, labels = data.load_dataset("digits", "train")
    # float32 images in [0, 1] of shape (4000, 1, 28, 28), int32 labels
    ```

    **Arguments:**

    - `name`: `"digits"` (bundled, offline), `"mnist"` (from `folder`, by default the
        download cache) or `"fashion-mnist"` (from `folder`, by default where Debian's
        `dataset-fashion-mnist` installs it).
    - `split`: `"train"` or `"test"`.
    - `folder`: a folder of IDX files to read instead of the default.
    - `download_missing`: for `"mnist"`, download the files (checksummed) if they
        are not in the folder.

    **Returns:**

    A 2-tuple `(images, labels)`.

    **Raises:**

    `ValueError` for an unknown name; `FileNotFoundError` with what to do if the
    files are not there; [`eqx_norm.data.IDXError`][] for invalid files, images
    that are not 8-bit, or labels that are not non-negative integers.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; choose one of {DATASETS}.")
    if folder is None:
        folder = {
            "digits": DIGITS,
            "mnist": default_cache() / "mnist",
            "fashion-mnist": FASHION_MNIST,
        }[name]
    folder = Path(folder)
    if name == "mnist" and download_missing:
        download(folder)
    try:
        images, labels = load_idx_dataset(folder, split)
    except FileNotFoundError as e:
        hint = {
            "mnist": "pass `download_missing=True` (--download) to fetch it",
            "fashion-mnist": "install Debian's `dataset-fashion-mnist` package",
            "digits": "reinstall eqx_norm",
        }[name]
        raise FileNotFoundError(
            f"{e} To get {name}: {hint}, or pass `folder`."
        ) from None
    if images.dtype != np.uint8:
        raise IDXError(
            f"{folder}: the {split} images are stored as {images.dtype}, but "
            "`load_dataset` reads 8-bit images (0-255, as MNIST stores them) and "
            "scales them to [0, 1]. Read other types with `load_idx_dataset` and "
            "scale them yourself."
        )
    if not np.issubdtype(labels.dtype, np.integer) or (
        labels.size and labels.min() < 0
    ):
        raise IDXError(
            f"{folder}: the {split} labels must be non-negative integers, got "
            f"{labels.dtype} values from {labels.min()} to {labels.max()}."
        )
    images = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return images, labels.astype(np.int32)


__all__ = [
    "DATASETS",
    "DIGITS",
    "DownloadError",
    "FASHION_MNIST",
    "IDXError",
    "MNIST_FILES",
    "MNIST_URL",
    "Remote",
    "default_cache",
    "download",
    "load_dataset",
    "load_idx_dataset",
    "read_idx",
]
