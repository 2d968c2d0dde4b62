"""The SAM comparison: the experiment's CNN with BatchNorm trained with the base
optimizer, SAM, ASAM, LookSAM and SAM with per-micro-batch perturbation, over
several seeds; test error against wall time."""

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax

from .. import APPROACHES, looksam, sam
from ._model import CNN
from ._report import marks_note, save_figure
from ._settings import SettingError, check_int, check_names, check_shared, wrap
from ._training import (
    accuracy,
    chunk_size,
    load_splits,
    train_chunk,
    training_step,
    versions,
)

METHODS = ("adam", "sam", "asam", "looksam", "sam-per-micro-batch")
"""The methods the comparison knows, in the order it runs and reports them."""

LOOKSAM_BUDGET = 1.3  # time per step against the base optimizer's
LOOKSAM_KEEPS = 0.5  # share of SAM's gain in test error that "most" means


@dataclasses.dataclass(frozen=True)
class SAMConfig:
    """The settings of the SAM comparison. The defaults run in about 10 minutes on
    2 CPU cores (under 15).

    **Attributes:**

    - `dataset`: `"fashion-mnist"` (default), `"mnist"` or `"digits"`.
    - `methods`: which of `"adam"` (the base optimizer), `"sam"`, `"asam"`,
        `"looksam"` and `"sam-per-micro-batch"` to run.
    - `approach`: the CNN's BatchNorm approach.
    - `seeds`: how many seeds each method runs (one after another, so that
        LookSAM's skipped passes are really skipped).
    - `steps`: training steps.
    - `batch_size`: examples per step.
    - `learning_rate`: Adam's learning rate, the base optimizer of every method.
    - `rho`: the radius of SAM, LookSAM and per-micro-batch SAM.
    - `asam_rho`: ASAM's radius (ASAM's perturbation is relative to the weights,
        so its radius is larger; the ASAM paper uses about ten times SAM's).
    - `every`, `alpha`: LookSAM's.
    - `micro_batches`: for `"sam-per-micro-batch"`, the number of micro-batches,
        each perturbed by its own gradient.
    - `evaluations`: how many times during training the test error is measured.
    - `data_dir`: a folder of IDX files to read instead of the data set's default.
    """

    dataset: str = "fashion-mnist"
    methods: tuple[str, ...] = METHODS
    approach: str = "batch"
    seeds: int = 3
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 3e-3
    rho: float = 0.05
    asam_rho: float = 0.5
    every: int = 5
    alpha: float = 0.7
    micro_batches: int = 4
    evaluations: int = 5
    data_dir: str | None = None

    def __post_init__(self):
        """Every setting checked before any data is loaded or any step runs: a
        `eqx_norm.experiments.SettingError` (a `ValueError`) names the one that
        cannot run."""
        check_shared(self, self.steps * self.batch_size)
        check_names("methods", self.methods, METHODS)
        if self.approach not in APPROACHES:
            raise SettingError(
                "approach",
                f"is the unknown approach {self.approach!r}; choose from "
                f"{tuple(APPROACHES)}.",
            )
        wrap("asam_rho", sam, optax.identity(), rho=self.asam_rho, adaptive=True)
        check_int("every", self.every, 1)  # LookSAM's int32 step counter
        wrap("alpha", looksam, optax.identity(), alpha=self.alpha)
        check_int("micro_batches", self.micro_batches, 1)
        if "sam-per-micro-batch" in self.methods:
            if self.batch_size < 2 * self.micro_batches:
                raise SettingError(
                    "batch_size",
                    "must be at least twice `micro_batches`, for a batch variance "
                    "in every micro-batch.",
                )
            if self.batch_size % self.micro_batches:
                raise SettingError(
                    "batch_size",
                    f"({self.batch_size}) must be a multiple of `micro_batches` "
                    f"({self.micro_batches}).",
                )
        chunks = self.steps // chunk_size(self.steps)
        check_int("evaluations", self.evaluations, 1)
        if self.evaluations > chunks:
            raise SettingError(
                "evaluations",
                f"must be at most {chunks} for {self.steps} steps: the test error "
                f"is measured between chunks of {chunk_size(self.steps)} steps, "
                f"got {self.evaluations}.",
            )


@dataclasses.dataclass
class SAMResults:
    """What the SAM comparison measured.

    **Attributes:**

    - `config`: the [`eqx_norm.experiments.SAMConfig`][] that ran.
    - `runs`: for each method, a dict of NumPy arrays: `loss` (per seed and step),
        `eval_steps` (the steps after which the test error was measured),
        `test_error` and `train_seconds` (per evaluation and seed: the test error
        then, and the training time so far, evaluation excluded and the compiling
        first chunk counted as a typical one), and `seconds_per_step` (per seed,
        the median over its training chunks).
    - `versions`: the versions of Python, JAX, Equinox, Optax and eqx_norm.
    - `seconds`: the wall time of the whole comparison.
    """

    config: SAMConfig
    runs: dict[str, dict[str, np.ndarray]]
    versions: dict[str, str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything, arrays as nested lists."""
        return {
            "config": dataclasses.asdict(self.config),
            "versions": self.versions,
            "seconds": self.seconds,
            "summary": summary(self),
            "runs": {
                method: {k: np.asarray(v).tolist() for k, v in run.items()}
                for method, run in self.runs.items()
            },
        }


def _step(method: str, config: SAMConfig):
    """The method's optimizer and its `sam_step`, built once for all seeds so that
    the training chunk compiles once."""
    base = optax.adam(config.learning_rate)
    if method in ("sam", "sam-per-micro-batch"):
        base = sam(base, rho=config.rho)
    elif method == "asam":
        base = sam(base, rho=config.asam_rho, adaptive=True)
    elif method == "looksam":
        base = looksam(base, rho=config.rho, every=config.every, alpha=config.alpha)
    if method == "sam-per-micro-batch":
        return training_step(
            base, micro_batches=config.micro_batches, perturbation="per-micro-batch"
        )
    return training_step(base)


def evaluation_steps(steps: int, evaluations: int) -> set[int]:
    """After which steps the test error is measured: `evaluations` ends of chunks,
    spread evenly, the last at `steps`."""
    chunk = chunk_size(steps)
    return {
        chunk * -(-round(steps * (k + 1) / evaluations) // chunk)
        for k in range(evaluations)
    }


def _train_seed(
    optimizer: optax.GradientTransformation,
    step: Callable,
    seed: int,
    config: SAMConfig,
    train: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array],
    on_steps: Callable[[int], object],
) -> dict[str, np.ndarray]:
    """One seed: the loss per step, the test error at each evaluation with the
    training time until then, and the median time per step."""
    model, state = eqx.nn.make_with_state(CNN)(
        config.approach, key=jax.random.key(seed)
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    trio = (model, state, opt_state)
    rng = np.random.default_rng(seed)
    n = len(train[0])
    epochs = -(-config.steps * config.batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    indices = order[: config.steps * config.batch_size].reshape(config.steps, -1)
    chunk = chunk_size(config.steps)
    targets = evaluation_steps(config.steps, config.evaluations)
    losses, times, evaluated, errors = [], [], [], []
    for t in range(0, config.steps, chunk):
        begin = time.perf_counter()
        trio, metrics = train_chunk(step, trio, indices[t : t + chunk], *train)
        losses.append(np.asarray(metrics["loss"]))  # waits for the chunk
        times.append(time.perf_counter() - begin)
        if t + chunk in targets:
            stacked = jax.tree.map(
                lambda a: a[None] if eqx.is_array(a) else a, trio[:2]
            )
            errors.append(1 - float(accuracy(stacked, *test)[0]))
            evaluated.append(len(times))
        on_steps(chunk)
    if len(times) > 1:  # the first chunk compiles: count it as a typical one
        times[0] = float(np.median(times[1:]))
    elapsed = np.cumsum(times)
    return {
        "loss": np.concatenate(losses),
        "eval_steps": np.asarray(evaluated) * chunk,
        "test_error": np.asarray(errors),
        "train_seconds": elapsed[np.asarray(evaluated) - 1],
        "seconds_per_step": np.asarray(np.median(times) / chunk),
    }


def run_sam_comparison(
    config: SAMConfig = SAMConfig(), *, progress: bool = True
) -> SAMResults:
    """Train the experiment's CNN (with BatchNorm) once per method and seed.

    **Arguments:**

    - `config`: an [`eqx_norm.experiments.SAMConfig`][].
    - `progress`: show a progress bar (needs `tqdm`, in the `experiment` extra).

    **Returns:**

    The [`eqx_norm.experiments.SAMResults`][].
    """
    start = time.perf_counter()
    # Every optimizer first, so that a bad hyperparameter fails before any training.
    steps = {method: _step(method, config) for method in config.methods}
    train, test = load_splits(config.dataset, config.data_dir)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(config.methods) * config.seeds * config.steps
        bar = tqdm(total=total, unit="step", desc="sam comparison")
    runs = {}
    for method in config.methods:
        optimizer, step = steps[method]
        per_seed = []
        for seed in range(config.seeds):
            if bar is not None:
                bar.set_postfix_str(f"{method}, seed {seed}")
            per_seed.append(
                _train_seed(
                    optimizer,
                    step,
                    seed,
                    config,
                    train,
                    test,
                    bar.update if bar else lambda n: None,
                )
            )
        runs[method] = {
            "loss": np.stack([r["loss"] for r in per_seed]),
            "eval_steps": per_seed[0]["eval_steps"],
            "test_error": np.stack([r["test_error"] for r in per_seed], axis=1),
            "train_seconds": np.stack([r["train_seconds"] for r in per_seed], axis=1),
            "seconds_per_step": np.stack([r["seconds_per_step"] for r in per_seed]),
        }
    if bar is not None:
        bar.close()
    return SAMResults(config, runs, versions(), time.perf_counter() - start)


MIN_SEEDS_FOR_CLAIMS = 2
"""Below this many seeds the summary gives no spread and no verdict: one seed's
difference between two methods is as likely noise as a finding."""


def summary(results: SAMResults) -> dict[str, Any]:
    """Per method: the final test error (mean, standard deviation and range over
    seeds), the training loss (the mean over the last tenth of the steps and the
    seeds) and the time per step relative to the first method's (the base
    optimizer, by default); and the verdicts of the claims: SAM and ASAM reach a
    lower mean test error than the base, LookSAM costs at most 1.3x the base's time
    per step and keeps at least half of SAM's gain.

    With fewer than two seeds there is no spread (`test_error_std` is `None`) and
    no verdict (`claims` is empty, and `no_claims` says why)."""
    runs = results.runs
    base = next(iter(runs))
    base_time = float(np.median(runs[base]["seconds_per_step"]))
    spread = results.config.seeds >= MIN_SEEDS_FOR_CLAIMS
    rows = {}
    for method, run in runs.items():
        final = run["test_error"][-1]
        tail = max(1, run["loss"].shape[1] // 10)
        rows[method] = {
            "test_error": float(np.mean(final)),
            "test_error_std": float(np.std(final)) if spread else None,
            "test_error_min": float(np.min(final)),
            "test_error_max": float(np.max(final)),
            "train_loss": float(np.mean(run["loss"][:, -tail:])),
            "time_per_step_vs_base": float(
                np.median(run["seconds_per_step"]) / base_time
            ),
        }
    if not spread:
        return {
            "base": base,
            "methods": rows,
            "claims": {},
            "no_claims": f"{results.config.seeds} seed: no spread over seeds and no "
            f"verdict on the claims (they need at least {MIN_SEEDS_FOR_CLAIMS} "
            "seeds, --seeds).",
        }
    verdicts = {}
    for method in ("sam", "asam"):
        if method in rows and method != base:
            verdicts[f"{method} beats {base}"] = bool(
                rows[method]["test_error"] < rows[base]["test_error"]
            )
    if "looksam" in rows and base != "looksam":
        verdicts[f"looksam costs at most {LOOKSAM_BUDGET}x {base}"] = bool(
            rows["looksam"]["time_per_step_vs_base"] <= LOOKSAM_BUDGET
        )
        if "sam" in rows:
            gain = rows[base]["test_error"] - rows["sam"]["test_error"]
            kept = rows[base]["test_error"] - rows["looksam"]["test_error"]
            verdicts["looksam keeps most of sam's gain"] = bool(
                gain > 0 and kept >= LOOKSAM_KEEPS * gain
            )
    return {"base": base, "methods": rows, "claims": verdicts}


def sam_table(results: SAMResults) -> str:
    """The summary as a plain-text table, then the claims and whether they hold
    (with fewer than two seeds: no spread, no verdict, and why)."""
    s = summary(results)
    lines = [
        f"{'method':<22}{'test error':>12}{'± std':>9}{'range':>17}"
        f"{'train loss':>12}{'time/step':>11}"
    ]
    for method, row in s["methods"].items():
        std, lo, hi = (
            row[k] for k in ("test_error_std", "test_error_min", "test_error_max")
        )
        spread = (
            f"{'-':>9}{'-':>17}" if std is None else f"{std:>9.4f}{lo:>8.4f}-{hi:<8.4f}"
        )
        lines.append(
            f"{method:<22}{row['test_error']:>12.4f}{spread}"
            f"{row['train_loss']:>12.4f}{row['time_per_step_vs_base']:>10.2f}x"
        )
    c = results.config
    lines.append(
        f"\n{c.dataset}, {c.seeds} seed{'s' * (c.seeds != 1)}, {c.steps} steps of "
        f"batch {c.batch_size}, Adam {c.learning_rate}; test error: mean over seeds, "
        f"± its standard deviation, range min-max; time per step relative to "
        f"{s['base']}."
    )
    if "no_claims" in s:
        lines.append(s["no_claims"])
    for claim, holds in s["claims"].items():
        lines.append(f"{claim}: {'holds' if holds else 'does not hold'}")
    return "\n".join(lines)


def plot_sam(results: SAMResults, path: str | Path) -> Path:
    """Test error against training wall time, one line per method: each point the
    mean over seeds, its error bar the range (min to max) over seeds, as the
    figure's note says; saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, run in results.runs.items():
        seconds = run["train_seconds"].mean(axis=1)
        error = run["test_error"]
        mean = error.mean(axis=1)
        ax.errorbar(
            seconds,
            mean,
            yerr=[mean - error.min(axis=1), error.max(axis=1) - mean],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set_xlabel("training wall time per seed (s)")
    ax.set_ylabel("test error (held-out)")
    ax.grid(alpha=0.3)
    c = results.config
    note = marks_note(c.seeds, "points", "bars")
    ax.legend(title=note, title_fontsize=8, fontsize=9)
    ax.set_title(
        f"{c.dataset}: CNN with BatchNorm ({c.approach}), {c.seeds} seeds, "
        f"{c.steps} steps, Adam {c.learning_rate}",
        fontsize=10,
    )
    return save_figure(fig, path)


def save_sam_results(results: SAMResults, out: str | Path) -> dict[str, Path]:
    """Write `sam.png`, `results.json` and `table.txt` into the folder `out`.

    **Returns:**

    A dict from kind (`"plot"`, `"json"`, `"table"`) to the path written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=1))
    (out / "table.txt").write_text(sam_table(results) + "\n")
    return {
        "plot": plot_sam(results, out / "sam.png"),
        "json": out / "results.json",
        "table": out / "table.txt",
    }
