import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple


class Remote(NamedTuple):
    """A file to download: its name, size in bytes and sha256."""

    name: str
    size: int
    sha256: str


MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
"""Where [`eqx_norm.data.download`][] fetches MNIST from by default: the base URL
that each file name of [`eqx_norm.data.MNIST_FILES`][] is appended to (a mirror of
the original files)."""
MNIST_FILES = (
    Remote(
        "train-images-idx3-ubyte.gz",
        9_912_422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    Remote(
        "train-labels-idx1-ubyte.gz",
        28_881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    Remote(
        "t10k-images-idx3-ubyte.gz",
        1_648_877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    Remote(
        "t10k-labels-idx1-ubyte.gz",
        4_542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
)
"""The four files of MNIST as [`eqx_norm.data.Remote`][] tuples (name, size in bytes,
sha256): the 60,000 training images and their labels, then the 10,000 test images
and their labels, as gzipped IDX files. [`eqx_norm.data.download`][] fetches these by
default and keeps each only if its size and sha256 match."""


class DownloadError(OSError):
    """A download failed or did not match its checksum; nothing was kept."""


def default_cache() -> Path:
    """`$EQX_NORM_DATA`, else `$XDG_CACHE_HOME/eqx_norm`, else `~/.cache/eqx_norm`.

    ```python
    from eqx_norm import data

    folder = data.default_cache() / "mnist"  # where `download` puts MNIST
    ```
    """
    if "EQX_NORM_DATA" in os.environ:
        return Path(os.environ["EQX_NORM_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "eqx_norm"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, remote: Remote, target: Path, timeout: float) -> None:
    # Write to a temporary file in the same folder, check it, then rename: a
    # failure at any point leaves nothing behind under the final name.
    fd, tmp = tempfile.mkstemp(prefix=f".{remote.name}.", dir=target.parent)
    try:
        digest = hashlib.sha256()
        size = 0
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=timeout) as response,
        ):
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
                size += len(block)
        if size != remote.size or digest.hexdigest() != remote.sha256:
            raise DownloadError(
                f"{url}: got {size} bytes with sha256 {digest.hexdigest()}, expected "
                f"{remote.size} bytes with sha256 {remote.sha256}. Nothing was kept; "
                "try again or another `base_url`."
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, DownloadError):
            raise
        raise DownloadError(f"{url}: download failed ({e}). Nothing was kept.") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download(
    folder: str | Path | None = None,
    *,
    base_url: str = MNIST_URL,
    files: tuple[Remote, ...] = MNIST_FILES,
    timeout: float = 60.0,
) -> Path:
    """Download files (by default the four canonical MNIST files) into a folder,
    checking each one's size and sha256.

    A file already present with the right checksum is kept as is. Each download is
    written to a temporary file that is renamed only once its checksum matches, so
    an interrupted or corrupted download never leaves a file under the final name.

    ```python
    from eqx_norm import data

    folder = data.download()  # 11.6 MB into data.default_cache() / "mnist"
    images, labels = data.load_idx_dataset(folder, "train")  # 60,000 digits
    ```

    **Arguments:**

    - `folder`: where to put the files; defaults to `default_cache() / "mnist"`.
    - `base_url`: the URL the file names are appended to.
    - `files`: what to fetch, as [`eqx_norm.data.Remote`][] tuples.
    - `timeout`: seconds to wait for the server.

    **Returns:**

    The folder, ready for [`eqx_norm.data.load_idx_dataset`][].

    **Raises:**

    [`eqx_norm.data.DownloadError`][] naming the URL, for a network or server error
    or a checksum mismatch.
    """
    folder = Path(folder) if folder is not None else default_cache() / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for remote in files:
        target = folder / remote.name
        if target.is_file() and _sha256(target) == remote.sha256:
            continue
        _fetch(base_url.rstrip("/") + "/" + remote.name, remote, target, timeout)
    return folder
