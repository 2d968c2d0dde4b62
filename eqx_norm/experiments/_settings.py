"""Checks of the experiments' settings, all made before any data is loaded or any
step runs: each error names the setting (and so the command-line flag) and says
what was wrong."""

import importlib.util
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optax

from .. import data, sam

INT32_MAX = 2**31 - 1
"""The largest count an int32 step counter (Optax's, LookSAM's) can reach."""

IDX_FILES = tuple(
    f"{split}-{kind}-ubyte"
    for split in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
)
"""The four files of an MNIST-format folder, each as `.gz` or uncompressed."""


class SettingError(ValueError):
    """A setting that cannot run.

    **Attributes:**

    - `setting`: the name of the setting (a field of the configuration, or
        `"out"` for the output folder).
    - `problem`: what is wrong with it, without its name.
    """

    def __init__(self, setting: str, problem: str):
        super().__init__(f"`{setting}` {problem}")
        self.setting = setting
        self.problem = problem


class DataNotFoundError(SettingError, FileNotFoundError):
    """The data set's files are not in the folder that `data_dir` names (or the
    default folder): a `eqx_norm.experiments.SettingError` of `data_dir`, and a
    `FileNotFoundError`."""


def check_int(setting: str, value: Any, minimum: int, maximum: int = INT32_MAX) -> int:
    """`value`, an int (not a bool) in [`minimum`, `maximum`]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingError(setting, f"must be an int, got {value!r}.")
    if value < minimum:
        raise SettingError(setting, f"must be at least {minimum}, got {value}.")
    if value > maximum:
        raise SettingError(setting, f"must be at most {maximum}, got {value}.")
    return value


def check_real(setting: str, value: Any, *, positive: bool = False) -> float:
    """`value`, a finite real number (not a bool) at least 0, or above 0 with
    `positive`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SettingError(setting, f"must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise SettingError(setting, f"must be finite, got {value}.")
    if positive and value <= 0:
        raise SettingError(setting, f"must be above 0, got {value}.")
    if value < 0:
        raise SettingError(setting, f"must be at least 0, got {value}.")
    return float(value)


def check_names(setting: str, names: Any, known: tuple[str, ...]) -> None:
    """`names`, a non-empty tuple of names from `known`, none twice."""
    if isinstance(names, str) or not isinstance(names, (tuple, list)):
        raise SettingError(
            setting, f"must be a tuple of names, got {names!r}; e.g. ({known[0]!r},)."
        )
    if not names:
        raise SettingError(setting, "is empty; name at least one.")
    seen = set()
    for name in names:
        if name not in known:
            raise SettingError(
                setting, f"holds the unknown name {name!r}; choose from {known}."
            )
        if name in seen:
            raise SettingError(setting, f"names {name!r} twice; name each once.")
        seen.add(name)


def wrap(setting: str, check, *args, **kwargs) -> None:
    """Run a library constructor as a check of `setting`: its `ValueError` or
    `TypeError` becomes a `eqx_norm.experiments.SettingError` of `setting`."""
    try:
        check(*args, **kwargs)
    except (ValueError, TypeError) as e:
        problem = str(e)
        prefix = f"`{setting}` "
        raise SettingError(
            setting, problem[len(prefix) :] if problem.startswith(prefix) else problem
        ) from None


def check_shared(config: Any, examples: int) -> None:
    """The settings both experiments have: `dataset`, `seeds`, `steps`,
    `batch_size`, `learning_rate` and `rho`; and `examples`, the size of the plan
    of batch indices, within int32."""
    if config.dataset not in data.DATASETS:
        raise SettingError("dataset", f"must be one of {data.DATASETS}.")
    check_int("seeds", config.seeds, 1)
    check_int("steps", config.steps, 1)
    check_int("batch_size", config.batch_size, 2)
    check_real("learning_rate", config.learning_rate, positive=True)
    wrap("rho", sam, optax.identity(), rho=config.rho)
    if examples > INT32_MAX:
        raise SettingError(
            "steps",
            f"({config.steps}) times `batch_size` ({config.batch_size}) is "
            f"{examples} examples to plan, more than the {INT32_MAX} of int32.",
        )


def check_output_folder(out: str | Path, files: Iterable[str] = ()) -> Path:
    """`out` as a `Path`, if it is a writable folder, or a folder that can be made
    (its nearest existing parent is a writable folder), and none of `files` in it is
    a folder. Nothing is written or left behind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SettingError("out", f"{str(out)!r} is a file, not a folder.")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SettingError(
            "out", f"{str(out)!r} cannot be made: {str(existing)!r} is a file."
        )
    try:  # a real write, which also tells read-only file systems and root apart
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        where = "" if existing == out else f" (in {str(existing)!r})"
        raise SettingError(
            "out", f"{str(out)!r} is not writable{where} ({e.strerror})."
        ) from None
    for name in files:
        if (out / name).is_dir():
            raise SettingError(
                "out", f"{str(out / name)!r} is a folder; the results go in that file."
            )
    return out


_HINTS = {
    "digits": "reinstall eqx_norm",
    "mnist": "download it first (`eqx_norm.data.download(folder)`, or the "
    "instability experiment's `download=True`, --download)",
    "fashion-mnist": "install Debian's `dataset-fashion-mnist` package",
}


def data_folder(dataset: str, data_dir: str | Path | None) -> Path:
    """The folder that [`eqx_norm.data.load_dataset`][] reads `dataset` from."""
    if data_dir is not None:
        return Path(data_dir)
    return {
        "digits": data.DIGITS,
        "mnist": data.default_cache() / "mnist",
        "fashion-mnist": data.FASHION_MNIST,
    }[dataset]


def check_data_folder(
    dataset: str, data_dir: str | Path | None, download: bool = False
) -> None:
    """A `eqx_norm.experiments.DataNotFoundError` unless the folder of `dataset`
    holds its four IDX files (their contents are checked when read), or they are to
    be downloaded (`"mnist"` with `download`)."""
    if dataset == "mnist" and download:
        return
    folder = data_folder(dataset, data_dir)
    fix = "name a folder of {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
    if data_dir is None:
        fix = f"{_HINTS[dataset]}, or {fix}"
    if not folder.exists():
        raise DataNotFoundError("data_dir", f"{str(folder)!r} does not exist; {fix}")
    if not folder.is_dir():
        raise DataNotFoundError("data_dir", f"{str(folder)!r} is not a folder; {fix}")
    for stem in IDX_FILES:
        if not any((folder / name).is_file() for name in (f"{stem}.gz", stem)):
            raise DataNotFoundError(
                "data_dir", f"{str(folder)!r} holds no {stem}[.gz]; {fix}"
            )


def check_installed(module: str, why: str) -> None:
    """An `ImportError` saying how to install `module` if it is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{module} is not installed; it is needed {why}. Install the "
            "`experiment` extra: `pip install 'eqx_norm[experiment]'`."
        )
