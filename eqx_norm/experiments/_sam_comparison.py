"""The SAM comparison: the experiment's CNN with BatchNorm trained with the base
optimizer and each SAM variant over several seeds, compared at equal steps and at
equal gradient evaluations (one base run per seed, continued to the costliest
method's count, serves both); test error against gradient evaluations and wall
time, and verdicts from paired differences over seeds."""

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax

from .. import APPROACHES, looksam, msam, normalisation_mask, sam
from . import _training as training
from ._model import CNN
from ._report import marks_note, save_figure
from ._settings import SettingError, check_int, check_names, check_shared, wrap

METHODS = (
    "adam",
    "sam",
    "asam",
    "sam-on",
    "asam-on",
    "looksam",
    "msam",
    "sam-per-micro-batch",
)
"""The methods the comparison knows, in the order it runs and reports them."""

TWO_PASSES = ("sam", "asam", "sam-on", "asam-on", "sam-per-micro-batch")
"""The methods that evaluate the gradient twice per step (per-micro-batch SAM: each
micro-batch twice, one batch's worth each time)."""


@dataclasses.dataclass(frozen=True)
class SAMConfig:
    """The settings of the SAM comparison. The defaults run in about 15 minutes on
    2 CPU cores (under 20).

    **Attributes:**

    - `dataset`: `"fashion-mnist"` (default), `"mnist"` or `"digits"`.
    - `methods`: which of `"adam"` (the base optimizer), `"sam"`, `"asam"`,
        `"sam-on"`, `"asam-on"` (SAM and ASAM perturbing the normalisation layers
        only, [`eqx_norm.normalisation_mask`][]), `"looksam"`, `"msam"`
        (Momentum-SAM) and `"sam-per-micro-batch"` to run; the first is the base
        the others are compared with.
    - `approach`: the CNN's BatchNorm approach.
    - `seeds`: how many seeds each method runs (one after another, so that
        LookSAM's skipped passes are really skipped). Every method sees the same
        batches in the same order for a given seed, so differences are paired.
    - `steps`: training steps of every method but the base, whose run goes on to
        the largest number of gradient evaluations any method makes in `steps`.
    - `batch_size`: examples per step.
    - `learning_rate`: Adam's learning rate, the base optimizer of every method.
    - `rho`: the radius of SAM, LookSAM and per-micro-batch SAM.
    - `asam_rho`: ASAM's radius (ASAM's perturbation is relative to the weights,
        so its radius is larger; the ASAM paper uses about ten times SAM's).
    - `sam_on_rho`, `asam_on_rho`: the radii of SAM-ON and ASAM-ON, larger again,
        as the perturbation acts on few parameters: the SAM-ON authors' code
        defaults to 0.5 and runs ASAM-ON with 10.
    - `msam_rho`: Momentum-SAM's radius; its authors' AdamW variant defaults to 1.
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
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    rho: float = 0.05
    asam_rho: float = 0.5
    sam_on_rho: float = 0.5
    asam_on_rho: float = 10.0
    msam_rho: float = 1.0
    every: int = 5
    alpha: float = 0.1
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
        identity = optax.identity()
        wrap("asam_rho", sam, identity, rho=self.asam_rho, adaptive=True)
        wrap("sam_on_rho", sam, identity, rho=self.sam_on_rho)
        wrap("asam_on_rho", sam, identity, rho=self.asam_on_rho, adaptive=True)
        wrap("msam_rho", msam, identity, rho=self.msam_rho)
        check_int("every", self.every, 1)  # LookSAM's int32 step counter
        wrap("alpha", looksam, identity, alpha=self.alpha)
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
        chunks = self.steps // training.chunk_size(self.steps)
        check_int("evaluations", self.evaluations, 1)
        if self.evaluations > chunks:
            raise SettingError(
                "evaluations",
                f"must be at most {chunks} for {self.steps} steps: the test error "
                "is measured between chunks of "
                f"{training.chunk_size(self.steps)} steps, "
                f"got {self.evaluations}.",
            )
        longest = base_plan(self)[0]
        if longest * self.batch_size > 2**31 - 1:
            raise SettingError(
                "steps",
                f"({self.steps}) needs a base run of {longest} steps to match the "
                f"gradient evaluations of the costliest method, and {longest} times "
                f"`batch_size` ({self.batch_size}) is more examples than int32 "
                "can plan.",
            )


def gradient_evaluations(method: str, steps: int, every: int) -> int:
    """How many gradients of one batch `method` evaluates in `steps` steps: 2 per
    step for SAM, ASAM, SAM-ON, ASAM-ON and per-micro-batch SAM, 1 plus one in
    `every` for LookSAM (on steps 0, `every`, ...), 1 for Adam and Momentum-SAM."""
    if method in TWO_PASSES:
        return 2 * steps
    if method == "looksam":
        return steps + -(-steps // every)
    return steps


def _steps_for(method: str, evaluations: int, every: int) -> int:
    """The fewest steps of `method` that evaluate at least `evaluations` gradients."""
    if method in TWO_PASSES:
        return -(-evaluations // 2)
    if method != "looksam":
        return evaluations
    steps = max(0, evaluations * every // (every + 1) - 1)
    while gradient_evaluations(method, steps, every) < evaluations:
        steps += 1
    return steps


def base_plan(config: SAMConfig) -> tuple[int, dict[str, list[int]]]:
    """The base run's length in steps, and for each method the base's step at each
    of that method's evaluations with as many gradient evaluations (rounded up to
    the end of a chunk, where the test error is measured): the base is compared
    with at least the method's compute, never less."""
    chunk = training.chunk_size(config.steps)
    base = config.methods[0]
    at = sorted(evaluation_steps(config.steps, config.evaluations))
    matching = {}
    for method in config.methods:
        matching[method] = [
            chunk
            * -(
                -_steps_for(
                    base,
                    gradient_evaluations(method, s, config.every),
                    config.every,
                )
                // chunk
            )
            for s in at
        ]
    longest = max(max(steps) for steps in matching.values())
    return max(longest, config.steps), matching


@dataclasses.dataclass
class SAMResults:
    """What the SAM comparison measured.

    **Attributes:**

    - `config`: the [`eqx_norm.experiments.SAMConfig`][] that ran.
    - `runs`: for each method, a dict of NumPy arrays: `loss` (per seed and step;
        the base's run is longer, see `base_plan`), `eval_steps` (the steps after
        which the test error was measured), `gradient_evaluations` (the gradients
        of one batch evaluated by then), `test_error` and `train_seconds` (per
        evaluation and seed: the test error then, and the training time so far,
        evaluation excluded and the compiling first chunk counted as a typical
        one), and `seconds_per_step` (per seed, the median over its training
        chunks).
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
    """The method around Adam."""
    adam = optax.adam(config.learning_rate)
    on = normalisation_mask
    return {
        "adam": lambda: adam,
        "sam": lambda: sam(adam, rho=config.rho),
        "sam-per-micro-batch": lambda: sam(adam, rho=config.rho),
        "asam": lambda: sam(adam, rho=config.asam_rho, adaptive=True),
        "sam-on": lambda: sam(adam, rho=config.sam_on_rho, mask=on),
        "asam-on": lambda: sam(adam, rho=config.asam_on_rho, adaptive=True, mask=on),
        "looksam": lambda: looksam(
            adam, rho=config.rho, every=config.every, alpha=config.alpha
        ),
        "msam": lambda: msam(adam, rho=config.msam_rho),
    }[method]()


def _step(method: str, config: SAMConfig):
    """The method's optimizer and its `sam_step`, built once for all seeds so that
    the training chunk compiles once."""
    base = _optimizer(method, config)
    if method == "sam-per-micro-batch":
        return training.training_step(
            base, micro_batches=config.micro_batches, perturbation="per-micro-batch"
        )
    return training.training_step(base)


def evaluation_steps(steps: int, evaluations: int) -> set[int]:
    """After which steps the test error is measured: `evaluations` ends of chunks,
    spread evenly, the last at `steps`."""
    chunk = training.chunk_size(steps)
    return {
        chunk * -(-round(steps * (k + 1) / evaluations) // chunk)
        for k in range(evaluations)
    }


def _train_seed(
    optimizer: optax.GradientTransformation,
    step: Callable,
    seed: int,
    config: SAMConfig,
    data: tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    steps: int,
    targets: set[int],
    on_steps: Callable[[int], object],
) -> dict[str, np.ndarray]:
    """One seed, `steps` steps: the loss per step, the test error after each of
    the `targets` steps with the training time until then, and the median time
    per step. The batches are the seed's, in the same order for every method."""
    train, test = data
    model, state = eqx.nn.make_with_state(CNN)(
        config.approach, key=jax.random.key(seed)
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    trio = (model, state, opt_state)
    rng = np.random.default_rng(seed)
    n = len(train[0])
    epochs = -(-steps * config.batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    indices = order[: steps * config.batch_size].reshape(steps, -1)
    chunk = training.chunk_size(config.steps)
    losses, times, evaluated, errors = [], [], [], []
    for t in range(0, steps, chunk):
        begin = time.perf_counter()
        trio, metrics = training.train_chunk(step, trio, indices[t : t + chunk], *train)
        losses.append(np.asarray(metrics["loss"]))  # waits for the chunk
        times.append(time.perf_counter() - begin)
        if t + chunk in targets:
            stacked = jax.tree.map(
                lambda a: a[None] if eqx.is_array(a) else a, trio[:2]
            )
            errors.append(1 - float(training.accuracy(stacked, *test)[0]))
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
    """Train the experiment's CNN (with BatchNorm) once per method and seed; the
    base method (the first) trains on until it has evaluated as many gradients as
    the costliest method, and is measured at each method's count.

    **Arguments:**

    - `config`: an [`eqx_norm.experiments.SAMConfig`][].
    - `progress`: show a progress bar (needs `tqdm`, in the `experiment` extra).

    **Returns:**

    The [`eqx_norm.experiments.SAMResults`][].
    """
    start = time.perf_counter()
    # Every optimizer first, so that a bad hyperparameter fails before any training.
    steps = {method: _step(method, config) for method in config.methods}
    data = training.load_splits(config.dataset, config.data_dir)
    base = config.methods[0]
    longest, matching = base_plan(config)
    targets = evaluation_steps(config.steps, config.evaluations)
    plan = {m: (config.steps, targets) for m in config.methods}
    plan[base] = (longest, targets | {s for m in matching.values() for s in m})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = config.seeds * sum(length for length, _ in plan.values())
        bar = tqdm(total=total, unit="step", desc="sam comparison")
    runs = {}
    for method in config.methods:
        optimizer, step = steps[method]
        length, at = plan[method]
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
                    data,
                    length,
                    at,
                    bar.update if bar else lambda n: None,
                )
            )
        eval_steps = per_seed[0]["eval_steps"]
        runs[method] = {
            "loss": np.stack([r["loss"] for r in per_seed]),
            "eval_steps": eval_steps,
            "gradient_evaluations": np.asarray(
                [gradient_evaluations(method, int(s), config.every) for s in eval_steps]
            ),
            "test_error": np.stack([r["test_error"] for r in per_seed], axis=1),
            "train_seconds": np.stack([r["train_seconds"] for r in per_seed], axis=1),
            "seconds_per_step": np.stack([r["seconds_per_step"] for r in per_seed]),
        }
    if bar is not None:
        bar.close()
    return SAMResults(config, runs, training.versions(), time.perf_counter() - start)


MIN_SEEDS_FOR_CLAIMS = 2
"""Below this many seeds the summary gives no spread and no verdict: one seed's
difference between two methods is as likely noise as a finding."""

# The 0.975 quantile of Student's t with 1 to 30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t distribution with `df` degrees of
    freedom (the half-width of a two-sided 95% interval, in standard errors): from
    a table up to 30, then the Cornish-Fisher expansion about the normal's 1.96
    (within 1e-4)."""
    if df < 1:
        raise ValueError(f"`df` must be at least 1, got {df}.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def paired_verdict(
    errors: np.ndarray, base_errors: np.ndarray, method: str, base: str
) -> dict[str, Any]:
    """The mean paired difference `errors - base_errors` over seeds, its 95%
    interval (Student's t) and the verdict: `"<method> beats <base>"` if the
    interval lies below zero, `"<base> beats <method>"` if above, else `"no clear
    difference"`."""
    d = np.asarray(errors, np.float64) - np.asarray(base_errors, np.float64)
    mean = float(np.mean(d))
    half = t_quantile(len(d) - 1) * float(np.std(d, ddof=1)) / math.sqrt(len(d))
    lo, hi = mean - half, mean + half
    if hi < 0:
        verdict = f"{method} beats {base}"
    elif lo > 0:
        verdict = f"{base} beats {method}"
    else:
        verdict = "no clear difference"
    return {"difference": mean, "interval": [lo, hi], "verdict": verdict}


def _at(run: dict[str, np.ndarray], step: int) -> int:
    """The index of the evaluation after `step` steps."""
    return int(np.flatnonzero(np.asarray(run["eval_steps"]) == step)[0])


def summary(results: SAMResults) -> dict[str, Any]:
    """Per method, after `steps` steps: the test error (mean, standard deviation
    and range over seeds), the gradient evaluations, the training loss (the mean
    over the last tenth of the steps and the seeds), the training wall time and the
    time per step relative to the base's (the first method). Per other method, the
    paired difference in test error against the base, with its 95% interval over
    seeds and the verdict, at equal steps and at equal gradient evaluations (the
    base run continued to the method's count, with its wall time); and the methods
    that pay for themselves: those that beat the base at equal gradient
    evaluations.

    With fewer than two seeds there is no spread (`test_error_std` is `None`) and
    no verdict (`comparisons` is empty, and `no_verdicts` says why)."""
    config = results.config
    runs = results.runs
    base = next(iter(runs))
    base_run = runs[base]
    base_time = float(np.median(base_run["seconds_per_step"]))
    spread = config.seeds >= MIN_SEEDS_FOR_CLAIMS
    rows = {}
    for method, run in runs.items():
        i = _at(run, config.steps)
        final = run["test_error"][i]
        tail = max(1, config.steps // 10)
        rows[method] = {
            "gradient_evaluations": int(run["gradient_evaluations"][i]),
            "test_error": float(np.mean(final)),
            "test_error_std": float(np.std(final)) if spread else None,
            "test_error_min": float(np.min(final)),
            "test_error_max": float(np.max(final)),
            "train_loss": float(
                np.mean(run["loss"][:, config.steps - tail : config.steps])
            ),
            "train_seconds": float(np.mean(run["train_seconds"][i])),
            "time_per_step_vs_base": float(
                np.median(run["seconds_per_step"]) / base_time
            ),
        }
    _, matching = base_plan(config)
    continued = {}
    for step in sorted(set(base_run["eval_steps"].tolist()) - {config.steps}):
        if step < config.steps:
            continue
        errors = base_run["test_error"][_at(base_run, step)]
        continued[int(step)] = {
            "gradient_evaluations": int(
                base_run["gradient_evaluations"][_at(base_run, step)]
            ),
            "test_error": float(np.mean(errors)),
            "test_error_std": float(np.std(errors)) if spread else None,
            "train_seconds": float(
                np.mean(base_run["train_seconds"][_at(base_run, step)])
            ),
        }
    out: dict[str, Any] = {"base": base, "methods": rows, "base_continued": continued}
    if not spread:
        out["comparisons"] = {}
        out["pays_for_itself"] = []
        out["no_verdicts"] = (
            f"{config.seeds} seed: no spread over seeds and no verdict (they need "
            f"at least {MIN_SEEDS_FOR_CLAIMS} seeds, --seeds)."
        )
        return out
    comparisons = {}
    base_final = base_run["test_error"][_at(base_run, config.steps)]
    for method, run in runs.items():
        if method == base:
            continue
        errors = run["test_error"][_at(run, config.steps)]
        equal_steps = paired_verdict(errors, base_final, method, base)
        equal_steps["base_steps"] = config.steps
        matched = matching[method][-1]
        j = _at(base_run, matched)
        equal_evaluations = paired_verdict(
            errors, base_run["test_error"][j], method, base
        )
        equal_evaluations["base_steps"] = matched
        equal_evaluations["base_gradient_evaluations"] = int(
            base_run["gradient_evaluations"][j]
        )
        equal_evaluations["base_train_seconds"] = float(
            np.mean(base_run["train_seconds"][j])
        )
        comparisons[method] = {
            "equal_steps": equal_steps,
            "equal_gradient_evaluations": equal_evaluations,
        }
    out["comparisons"] = comparisons
    out["pays_for_itself"] = [
        m
        for m, c in comparisons.items()
        if c["equal_gradient_evaluations"]["verdict"] == f"{m} beats {base}"
    ]
    return out


def _difference(c: dict[str, Any]) -> str:
    lo, hi = c["interval"]
    return f"{c['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] {c['verdict']}"


def sam_table(results: SAMResults) -> str:
    """The summary as plain text: per method the test error after the same steps
    (with the base continued to the other methods' gradient evaluations), then the
    paired differences against the base and their verdicts at equal steps and at
    equal gradient evaluations, and which methods pay for themselves (with fewer
    than two seeds: no spread, no verdict, and why)."""
    s = summary(results)
    c = results.config
    base = s["base"]
    lines = [
        f"{'method':<22}{'grad evals':>11}{'test error':>12}{'± std':>9}"
        f"{'range':>17}{'train loss':>12}{'wall s':>9}{'time/step':>11}"
    ]
    for method, row in s["methods"].items():
        std, lo, hi = (
            row[k] for k in ("test_error_std", "test_error_min", "test_error_max")
        )
        spread = (
            f"{'-':>9}{'-':>17}" if std is None else f"{std:>9.4f}{lo:>8.4f}-{hi:<8.4f}"
        )
        lines.append(
            f"{method:<22}{row['gradient_evaluations']:>11}"
            f"{row['test_error']:>12.4f}{spread}{row['train_loss']:>12.4f}"
            f"{row['train_seconds']:>9.1f}{row['time_per_step_vs_base']:>10.2f}x"
        )
    for step, row in s["base_continued"].items():  # the base's longer run
        std = row["test_error_std"]
        cells = (
            f"{base} @ {step} steps",
            row["gradient_evaluations"],
            row["test_error"],
            "-" if std is None else f"{std:.4f}",
            row["train_seconds"],
        )
        lines.append("{:<22}{:>11}{:>12.4f}{:>9}{:>38.1f}".format(*cells))
    lines.append(
        f"\n{c.dataset}, {c.seeds} seed{'s' * (c.seeds != 1)}, {c.steps} steps of "
        f"batch {c.batch_size} ({base} continued to match the others' gradient "
        f"evaluations), Adam {c.learning_rate}; test error: mean over seeds, "
        f"± its standard deviation, range min-max; wall s: training time per seed; "
        f"time per step relative to {base}."
    )
    if "no_verdicts" in s:
        lines.append(s["no_verdicts"])
        return "\n".join(lines)
    lines.append(
        f"\nTest error, method - {base}, paired by seed: mean [95% interval, "
        f"Student's t over {c.seeds} seeds] verdict"
    )
    lines.append(f"{'method':<22}{'at equal steps':<52}at equal gradient evaluations")
    for method, comparison in s["comparisons"].items():
        evals = comparison["equal_gradient_evaluations"]
        lines.append(
            f"{method:<22}{_difference(comparison['equal_steps']):<52}"
            f"{_difference(evals)} ({base} at {evals['base_steps']} steps, "
            f"{evals['base_train_seconds']:.0f} s)"
        )
    paying = s["pays_for_itself"]
    lines.append(
        f"\nPays for itself (beats {base} at equal gradient evaluations): "
        + (", ".join(paying) if paying else "none")
    )
    return "\n".join(lines)


def plot_sam(results: SAMResults, path: str | Path) -> Path:
    """Test error against gradient evaluations (left) and against training wall
    time (right), one line per method, the base run continued to the costliest
    method's gradient evaluations: each point the mean over seeds, its error bar
    the range (min to max) over seeds, as the figure's note says; saved to
    `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for method, run in results.runs.items():
        error = run["test_error"]
        mean = error.mean(axis=1)
        bars = [mean - error.min(axis=1), error.max(axis=1) - mean]
        xs = (run["gradient_evaluations"], run["train_seconds"].mean(axis=1))
        for ax, x in zip(axes, xs):
            ax.errorbar(x, mean, yerr=bars, marker="o", capsize=3, label=method)
    axes[0].set_xlabel("gradient evaluations (forward-backward passes of a batch)")
    axes[1].set_xlabel("training wall time per seed (s)")
    axes[0].set_ylabel("test error (held-out)")
    for ax in axes:
        ax.grid(alpha=0.3)
    c = results.config
    note = marks_note(c.seeds, "points", "bars")
    axes[0].legend(title=note, title_fontsize=8, fontsize=8)
    fig.suptitle(
        f"{c.dataset}: CNN with BatchNorm ({c.approach}), {c.seeds} seeds, "
        f"{c.steps} steps ({results.config.methods[0]} continued to equal gradient "
        f"evaluations), Adam {c.learning_rate}",
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
