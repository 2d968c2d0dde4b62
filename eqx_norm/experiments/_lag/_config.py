"""The lag experiment's settings: its four regimes, its configuration, and what a
run returns."""

import dataclasses
from typing import Any

import numpy as np

from ... import BatchNorm
from .. import _training as training
from .._settings import SettingError, check_int, check_names, check_real, wrap
from .._side_by_side import BATCH_STATISTICS, RECALIBRATED


@dataclasses.dataclass(frozen=True)
class Regime:
    """How one regime trains.

    **Attributes:**

    - `model`: `"resnet"` (the residual CNN) or `"mlp"`.
    - `batch_size`: examples per step.
    - `steps`: training steps.
    - `schedule`: `"constant"` (Adam's learning rate throughout) or `"cosine"`
        (decayed to zero over the steps).
    - `about`: what the regime stands for.
    """

    model: str
    batch_size: int
    steps: int
    schedule: str
    about: str


REGIMES = {
    "fast": Regime(
        "resnet", 64, 300, "constant", "residual CNN, batch 64, 300 steps, constant"
    ),
    "settled": Regime(
        "resnet", 64, 1500, "cosine", "residual CNN, batch 64, 1,500 steps, cosine"
    ),
    "noisy": Regime("mlp", 8, 1500, "cosine", "MLP, batch 8, 1,500 steps, cosine"),
    "noisy-moving": Regime(
        "mlp", 8, 300, "constant", "MLP, batch 8, 300 steps, constant"
    ),
}
"""The four regimes: weights that move fast (`fast`), that settle (`settled`), small
noisy batches on settling weights (`noisy`) and on moving ones (`noisy-moving`)."""

TRACKING = "running, tracking"


def running_label(momentum: float) -> str:
    """The reading of `approach="batch"`'s running statistics at `momentum`."""
    return f"running, batch {momentum}"


@dataclasses.dataclass(frozen=True)
class LagConfig:
    """The settings of the lag experiment. The defaults run in about 6 minutes on
    2 CPU cores.

    **Attributes:**

    - `dataset`: `"fashion-mnist"` (default; the bundled `"digits"` when it is not
        installed and `data_dir` is not given), `"mnist"` or `"digits"`.
    - `regimes`: which of `"fast"`, `"settled"`, `"noisy"` and `"noisy-moving"`
        to run (see `REGIMES`).
    - `seeds`: seeds per regime, trained together as one vmapped ensemble.
    - `learning_rate`: Adam's (peak) learning rate.
    - `momenta`: the momenta of `approach="batch"` whose running statistics are
        read (0.0: the last batch's statistics alone, the closest any statistics
        of past batches can follow moving weights).
    - `evaluations`: how many times during each run the test accuracy is read.
    - `recalibration_batches`: the training batches of 64 that `recalibrate`
        computes the recalibrated statistics from (the same for every regime and
        seed).
    - `steps`: training steps of every regime instead of its own (`None`: each
        regime's; a quick look takes fewer).
    - `data_dir`: a folder of IDX files to read instead of the data set's default.
    """

    dataset: str = "fashion-mnist"
    regimes: tuple[str, ...] = tuple(REGIMES)
    seeds: int = 2
    learning_rate: float = 3e-3
    momenta: tuple[float, ...] = (0.99, 0.9, 0.5, 0.0)
    evaluations: int = 6
    recalibration_batches: int = 50
    steps: int | None = None
    data_dir: str | None = None

    @property
    def falls_back(self) -> bool:
        """Whether the bundled digits stand in where Fashion-MNIST is missing."""
        return self.dataset == "fashion-mnist" and self.data_dir is None

    def __post_init__(self):
        """Every setting checked before any data is loaded or any step runs."""
        from ...data import DATASETS

        if self.dataset not in DATASETS:
            raise SettingError("dataset", f"must be one of {DATASETS}.")
        check_names("regimes", self.regimes, tuple(REGIMES))
        check_int("seeds", self.seeds, 1, 64)
        check_real("learning_rate", self.learning_rate, positive=True)
        momenta = self.momenta
        if isinstance(momenta, str) or not isinstance(momenta, (tuple, list)):
            raise SettingError("momenta", f"must be a tuple, got {momenta!r}.")
        if not momenta:
            raise SettingError("momenta", "is empty; give at least one.")
        if len(set(momenta)) != len(momenta):
            raise SettingError("momenta", f"names a momentum twice: {momenta!r}.")
        for m in momenta:
            wrap("momenta", BatchNorm, 1, "batch", momentum=m)
        check_int("recalibration_batches", self.recalibration_batches, 1, 10_000)
        if self.steps is not None:
            check_int("steps", self.steps, 1, 1_000_000)
        shortest = min(
            REGIMES[r].steps if self.steps is None else self.steps for r in self.regimes
        )
        chunks = shortest // training.chunk_size(shortest)
        check_int("evaluations", self.evaluations, 1, chunks)


@dataclasses.dataclass
class LagResults:
    """What the lag experiment measured.

    **Attributes:**

    - `config`: the [`eqx_norm.experiments.LagConfig`][] that ran.
    - `dataset`: the data set that was used (the bundled digits where
        Fashion-MNIST was asked for and is not installed).
    - `runs`: per regime, a dict: `eval_steps` (after which steps the test
        accuracy was read), `loss` (per seed and step), and `accuracy`, a dict from
        reading (`"batch statistics"`, `"running, batch 0.99"`, ...,
        `"running, tracking"`, `"recalibrated"`) to the test accuracy per seed and
        evaluation, shape `(seeds, evaluations)`.
    - `versions`: the versions of Python, JAX, Equinox, Optax and eqx_norm.
    - `seconds`: the wall time of the whole experiment.
    """

    config: LagConfig
    dataset: str
    runs: dict[str, dict[str, Any]]
    versions: dict[str, str]
    seconds: float

    def readings(self) -> list[str]:
        """The readings, in the order the table and the figure show them."""
        return [
            BATCH_STATISTICS,
            *map(running_label, self.config.momenta),
            TRACKING,
            RECALIBRATED,
        ]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything, arrays as nested lists, with the
        summary."""

        def plain(x):
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            return np.asarray(x).tolist()

        return {
            "config": dataclasses.asdict(self.config),
            "dataset": self.dataset,
            "versions": self.versions,
            "seconds": self.seconds,
            "summary": lag_summary(self),
            "runs": plain(self.runs),
        }


def lag_summary(results: LagResults) -> dict[str, Any]:
    """Per regime and reading, the test accuracy minus the same weights' accuracy
    with batch statistics: at the last evaluation (mean over seeds and per seed)
    and averaged over every evaluation and seed."""
    out: dict[str, Any] = {}
    for name, run in results.runs.items():
        accuracy = run["accuracy"]
        base = np.asarray(accuracy[BATCH_STATISTICS])
        rows = {}
        for label in results.readings():
            a = np.asarray(accuracy[label])
            rows[label] = {
                "final": float(np.mean(a[:, -1])),
                "final_vs_batch_statistics": float(np.mean(a[:, -1] - base[:, -1])),
                "final_vs_batch_statistics_per_seed": (a[:, -1] - base[:, -1]).tolist(),
                "all_evaluations_vs_batch_statistics": float(np.mean(a - base)),
            }
        out[name] = rows
    return out
