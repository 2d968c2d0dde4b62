"""The lag experiment: how far inference with running statistics falls behind the
model it evaluates, in four regimes, for fixed momenta, `approach="tracking"` and
recalibrated statistics.

Every reading compared here trains as `approach="batch"` does (the batch's own
statistics normalise each training batch), so one training run per regime and
seed serves them all: each step records every BatchNorm layer's batch statistics
(the recording pass that `recalibrate` uses), and each approach's running
statistics are updated from them by the approach itself, side by side."""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import (
    Approach,
    Batch,
    BatchNorm,
    Tracking,
    sam_step,
)
from . import _training as training
from ._lag_models import MODELS
from ._settings import SettingError, check_int, check_names, check_real, wrap
from ._side_by_side import BATCH_STATISTICS, RECALIBRATED, SideBySide, readings


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
        from ..data import DATASETS

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


def side_by_side(config: LagConfig) -> SideBySide:
    """The approaches whose running statistics the experiment reads."""
    compared: list[tuple[str, Approach, float]] = [
        (running_label(m), Batch(), m) for m in config.momenta
    ]
    compared.append((TRACKING, Tracking(), config.momenta[0]))
    return SideBySide(tuple(compared))


def _loss(model, state, x, y):
    logits, state = jax.vmap(
        model, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
    )(x, state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


@eqx.filter_jit
def _chunk(step, trio, indices, images, labels):
    dynamic, static = eqx.partition(trio, eqx.is_array)

    def body(dynamic, idx):
        model, state, opt_state = eqx.combine(dynamic, static)
        model, state, opt_state, loss = step(
            model, state, opt_state, images[idx], labels[idx]
        )
        return eqx.filter((model, state, opt_state), eqx.is_array), loss

    # Unrolled: in a rolled loop XLA:CPU runs the residual CNN's training step
    # about six times slower than as straight-line code (measured: 127 ms a step
    # against 17 ms).
    dynamic, losses = jax.lax.scan(body, dynamic, indices, unroll=True)
    return eqx.combine(dynamic, static), losses


@eqx.filter_jit
def _correct(model, state, images, labels, inference: bool):
    model = eqx.nn.inference_mode(model, inference)
    logits, _ = jax.vmap(
        model, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
    )(images, state)
    return jnp.sum(jnp.argmax(logits, axis=1) == labels)


def _accuracy(model, state, test, inference: bool, chunk: int = 1000) -> float:
    """Test accuracy, in chunks of `chunk` images: in training mode each chunk is
    normalised with its own statistics."""
    images, labels = test
    correct = 0
    for i in range(0, len(images), chunk):
        correct += int(
            _correct(
                model, state, images[i : i + chunk], labels[i : i + chunk], inference
            )
        )
    return correct / len(images)


def _readings(model, state, test, recal, labels: list[str]) -> dict[str, float]:
    """The test accuracy of the model (trained with `SideBySide`) read with batch
    statistics, with each kept approach's running statistics, and recalibrated."""

    def accuracy(model, state, inference):
        return _accuracy(model, state, test, inference=inference)

    return readings(model, state, recal, labels, accuracy)


def evaluation_steps(steps: int, evaluations: int) -> list[int]:
    """After which steps the test accuracy is read: `evaluations` ends of chunks,
    spread evenly, the last at `steps`."""
    chunk = training.chunk_size(steps)
    chunks = steps // chunk
    return sorted(
        {chunk * round(chunks * (k + 1) / evaluations) for k in range(evaluations)}
    )


def _run_regime(
    name: str, config: LagConfig, train, test, recal, on_steps: Callable[[int], Any]
) -> dict[str, Any]:
    regime = REGIMES[name]
    steps = regime.steps if config.steps is None else config.steps
    schedule = (
        optax.cosine_decay_schedule(config.learning_rate, steps)
        if regime.schedule == "cosine"
        else config.learning_rate
    )
    optimizer = optax.adam(schedule)
    step = sam_step(_loss, optimizer)
    approach = side_by_side(config)
    labels = [label for label, _, _ in approach.compared]
    chunk = training.chunk_size(steps)
    evals = evaluation_steps(steps, config.evaluations)
    readings: dict[str, list[list[float]]] = {}
    losses = []
    for seed in range(config.seeds):
        model, state = eqx.nn.make_with_state(MODELS[regime.model])(
            approach, key=jax.random.key(seed)
        )
        trio = (model, state, optimizer.init(eqx.filter(model, eqx.is_inexact_array)))
        rng = np.random.default_rng(seed)
        n = len(train[0])
        order = np.concatenate(
            [rng.permutation(n) for _ in range(-(-steps * regime.batch_size // n))]
        )
        order = order[: steps * regime.batch_size].reshape(steps, -1)
        seed_readings: dict[str, list[float]] = {}
        seed_losses = []
        for t in range(0, steps, chunk):
            trio, loss = _chunk(step, trio, order[t : t + chunk], *train)
            seed_losses.append(np.asarray(loss))
            on_steps(chunk)
            if t + chunk in evals:
                read = _readings(trio[0], trio[1], test, recal, labels)
                for label, value in read.items():
                    seed_readings.setdefault(label, []).append(value)
        for label, values in seed_readings.items():
            readings.setdefault(label, []).append(values)
        losses.append(np.concatenate(seed_losses))
    return {
        "eval_steps": np.asarray(evals),
        "loss": np.stack(losses),
        "accuracy": {k: np.asarray(v) for k, v in readings.items()},
    }


def run_lag(config: LagConfig = LagConfig(), *, progress: bool = True) -> LagResults:
    """Train each regime's model once per seed with batch statistics, and read its
    test accuracy during training with the batch's own statistics, with each
    approach's running statistics and recalibrated.

    **Arguments:**

    - `config`: a [`eqx_norm.experiments.LagConfig`][].
    - `progress`: show a progress bar (needs `tqdm`, in the `experiment` extra).

    **Returns:**

    The [`eqx_norm.experiments.LagResults`][].
    """
    from ._settings import DataNotFoundError, check_data_folder

    start = time.perf_counter()
    dataset = config.dataset
    try:
        check_data_folder(dataset, config.data_dir)
    except DataNotFoundError:
        if not config.falls_back:
            raise
        dataset = "digits"  # Fashion-MNIST is not installed: the bundled digits
    train, test = training.load_splits(
        dataset, config.data_dir if dataset == config.dataset else None
    )
    recal = training.recalibration_batches(train[0], config.recalibration_batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = config.seeds * sum(
            REGIMES[r].steps if config.steps is None else config.steps
            for r in config.regimes
        )
        bar = tqdm(total=total, unit="step", desc="lag")
    runs = {}
    for name in config.regimes:
        if bar is not None:
            bar.set_postfix_str(name)
        runs[name] = _run_regime(
            name, config, train, test, recal, bar.update if bar else lambda n: None
        )
    if bar is not None:
        bar.close()
    return LagResults(
        config, dataset, runs, training.versions(), time.perf_counter() - start
    )


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


def lag_table(results: LagResults) -> str:
    """The summary as plain text: per regime, each reading's test accuracy at the
    end of training, and the difference from batch statistics at the end and over
    every evaluation."""
    s = lag_summary(results)
    c = results.config
    lines = []
    for name, rows in s.items():
        regime = REGIMES[name]
        steps = "" if c.steps is None else f" (here {c.steps} steps)"
        lines.append(f"{name}: {regime.about}{steps}")
        lines.append(
            f"  {'reading':<24}{'final acc':>10}{'final - batch':>15}"
            f"{'per seed':>24}{'all evals - batch':>19}"
        )
        for label, row in rows.items():
            seeds = " ".join(
                f"{d:+.3f}" for d in row["final_vs_batch_statistics_per_seed"]
            )
            lines.append(
                f"  {label:<24}{row['final']:>10.3f}"
                f"{row['final_vs_batch_statistics']:>+15.3f}{seeds:>24}"
                f"{row['all_evaluations_vs_batch_statistics']:>+19.3f}"
            )
        lines.append("")
    c = results.config
    lines.append(
        f"{results.dataset}, {c.seeds} seed{'s' * (c.seeds != 1)}, Adam "
        f"{c.learning_rate}; test accuracy on the full test set; batch statistics: "
        "training mode on test batches of 1,000; running: inference mode; "
        f"recalibrated: eqx_norm.recalibrate on {c.recalibration_batches} training "
        "batches of 64, then inference mode; - batch: minus the batch statistics' "
        "accuracy of the same weights."
    )
    return "\n".join(lines)


def plot_lag(results: LagResults, path) -> Any:
    """Test accuracy over the steps, one panel per regime, one line per reading
    (the mean over seeds, the band their range); saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._report import marks_note, save_figure

    names = list(results.runs)
    cols = min(2, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(6.2 * cols, 4.2 * rows + 0.8), squeeze=False
    )
    fixed = ["tab:blue", "tab:purple", "tab:orange", "tab:brown", "tab:pink"]
    styles = {
        BATCH_STATISTICS: ("k", "-", 2.2),
        TRACKING: ("tab:red", "-", 2.2),
        RECALIBRATED: ("tab:green", "--", 1.8),
    }
    for i, m in enumerate(results.config.momenta):
        styles[running_label(m)] = (fixed[i % len(fixed)], "-", 1.2)
    for ax, name in zip(axes.flat, names):
        run = results.runs[name]
        steps = np.asarray(run["eval_steps"])
        for label in results.readings():
            a = np.asarray(run["accuracy"][label])
            colour, line, width = styles[label]
            ax.plot(
                steps,
                a.mean(0),
                line,
                color=colour,
                lw=width,
                marker="o",
                ms=3,
                label=label,
            )
            if a.shape[0] > 1:
                ax.fill_between(
                    steps, a.min(0), a.max(0), color=colour, alpha=0.12, lw=0
                )
        ax.set_title(f"{name}: {REGIMES[name].about}", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy (full test set)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(len(labels), 6),
        fontsize=9,
        title=marks_note(results.config.seeds, "lines", "bands"),
        title_fontsize=8,
    )
    fig.suptitle(
        f"{results.dataset}: test accuracy read with batch statistics, with running "
        "statistics (batch at each momentum, tracking) and recalibrated",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    return save_figure(fig, path, layout=False)


def save_lag_results(results: LagResults, out) -> dict[str, Any]:
    """Write `lag.png`, `results.json` and `table.txt` into the folder `out`.

    **Returns:**

    A dict from kind (`"plot"`, `"json"`, `"table"`) to the path written.
    """
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=1))
    (out / "table.txt").write_text(lag_table(results) + "\n")
    return {
        "plot": plot_lag(results, out / "lag.png"),
        "json": out / "results.json",
        "table": out / "table.txt",
    }
