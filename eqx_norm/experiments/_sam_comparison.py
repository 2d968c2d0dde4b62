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
import jax.numpy as jnp
import numpy as np
import optax

from .. import data
from .._looksam import looksam
from .._sam import sam
from .._step import sam_step
from ._model import CNN
from ._report import save_figure
from ._run import (
    _chunk_size,
    _loss_fn,
    _record_grad_norms,
    _test_accuracy,
    _train_chunk,
    _versions,
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
        if isinstance(self.methods, str):
            raise ValueError(
                f"`methods` must be a tuple of names, got the string {self.methods!r}; "
                f"e.g. `methods=({self.methods!r},)`."
            )
        ints = ("seeds", "steps", "batch_size", "every", "micro_batches", "evaluations")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"`{name}` must be an int, got {value!r}.")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"Unknown method {m!r}; choose from {METHODS}.")
        if not self.methods:
            raise ValueError("`methods` is empty; name at least one.")
        for name in ("seeds", "steps", "every", "micro_batches", "evaluations"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1.")
        if self.batch_size < 2 * self.micro_batches:
            raise ValueError(
                "`batch_size` must be at least twice `micro_batches`, for a batch "
                "variance in every micro-batch."
            )
        if "sam-per-micro-batch" in self.methods and (
            self.batch_size % self.micro_batches
        ):
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must be a multiple of "
                f"`micro_batches` ({self.micro_batches})."
            )
        if self.dataset not in data.DATASETS:
            raise ValueError(f"`dataset` must be one of {data.DATASETS}.")


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


def _optimizer(method: str, config: SAMConfig) -> optax.GradientTransformation:
    base = optax.adam(config.learning_rate)
    if method in ("sam", "sam-per-micro-batch"):
        base = sam(base, rho=config.rho)
    elif method == "asam":
        base = sam(base, rho=config.asam_rho, adaptive=True)
    elif method == "looksam":
        base = looksam(base, rho=config.rho, every=config.every, alpha=config.alpha)
    return optax.chain(_record_grad_norms(), base)


def _step(method: str, config: SAMConfig):
    """The method's optimizer and its `sam_step`, built once for all seeds so that
    the training chunk compiles once."""
    optimizer = _optimizer(method, config)
    per_micro_batch = method == "sam-per-micro-batch"
    step = sam_step(
        _loss_fn,
        optimizer,
        has_aux=True,
        micro_batches=config.micro_batches if per_micro_batch else 1,
        perturbation="per-micro-batch" if per_micro_batch else "whole-batch",
    )
    return optimizer, step


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
    chunk = _chunk_size(config.steps)
    targets = {
        chunk * -(-round(config.steps * (k + 1) / config.evaluations) // chunk)
        for k in range(config.evaluations)
    }
    losses, times, evaluated, errors = [], [], [], []
    for t in range(0, config.steps, chunk):
        begin = time.perf_counter()
        trio, metrics = _train_chunk(step, trio, indices[t : t + chunk], *train)
        losses.append(np.asarray(metrics["loss"]))  # waits for the chunk
        times.append(time.perf_counter() - begin)
        if t + chunk in targets:
            stacked = jax.tree.map(
                lambda a: a[None] if eqx.is_array(a) else a, trio[:2]
            )
            errors.append(1 - float(_test_accuracy(stacked, *test)[0]))
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
    train = data.load_dataset(config.dataset, "train", folder=config.data_dir)
    test = data.load_dataset(config.dataset, "test", folder=config.data_dir)
    train = (jnp.asarray(train[0]), jnp.asarray(train[1]))
    test = (jnp.asarray(test[0]), jnp.asarray(test[1]))
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
    return SAMResults(config, runs, _versions(), time.perf_counter() - start)


def summary(results: SAMResults) -> dict[str, Any]:
    """Per method: the final test error (mean, standard deviation and range over
    seeds), the training loss (the mean over the last tenth of the steps and the
    seeds) and the time per step relative to the first method's (the base
    optimizer, by default); and the verdicts of the claims: SAM and ASAM reach a
    lower mean test error than the base, LookSAM costs at most 1.3x the base's time
    per step and keeps at least half of SAM's gain."""
    runs = results.runs
    base = next(iter(runs))
    base_time = float(np.median(runs[base]["seconds_per_step"]))
    rows = {}
    for method, run in runs.items():
        final = run["test_error"][-1]
        tail = max(1, run["loss"].shape[1] // 10)
        rows[method] = {
            "test_error": float(np.mean(final)),
            "test_error_std": float(np.std(final)),
            "test_error_min": float(np.min(final)),
            "test_error_max": float(np.max(final)),
            "train_loss": float(np.mean(run["loss"][:, -tail:])),
            "time_per_step_vs_base": float(
                np.median(run["seconds_per_step"]) / base_time
            ),
        }
    verdicts = {}
    if base in rows:
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
    """The summary as a plain-text table, then the claims and whether they hold."""
    s = summary(results)
    lines = [
        f"{'method':<22}{'test error':>12}{'± std':>9}{'range':>17}"
        f"{'train loss':>12}{'time/step':>11}"
    ]
    for method, row in s["methods"].items():
        lines.append(
            f"{method:<22}{row['test_error']:>12.4f}{row['test_error_std']:>9.4f}"
            f"{row['test_error_min']:>8.4f}-{row['test_error_max']:<8.4f}"
            f"{row['train_loss']:>12.4f}{row['time_per_step_vs_base']:>10.2f}x"
        )
    c = results.config
    lines.append(
        f"\n{c.dataset}, {c.seeds} seeds, {c.steps} steps of batch {c.batch_size}, "
        f"Adam {c.learning_rate}; time per step relative to {s['base']}."
    )
    for claim, holds in s["claims"].items():
        lines.append(f"{claim}: {'holds' if holds else 'does not hold'}")
    return "\n".join(lines)


def plot_sam(results: SAMResults, path: str | Path) -> Path:
    """Test error against training wall time, one line per method (the mean over
    seeds, with its range as error bars), saved to `path`."""
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
    ax.legend()
    c = results.config
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
