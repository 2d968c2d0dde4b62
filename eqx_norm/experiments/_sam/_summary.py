"""What the SAM comparison concludes: per method, the test error read from
recalibrated statistics; per other method, paired differences with the base at
equal steps and at equal gradient evaluations, Student's t intervals over seeds,
verdicts worded by what they can resolve; the table and the figure."""

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from .._figures import marks_note, save_figure, save_outputs
from ._config import (
    TWO_PASSES,
    SAMConfig,
    base_lengths,
    continued,
)

MIN_SEEDS_FOR_CLAIMS = 3
"""Below this many seeds the summary gives no verdict: with two, a 95% interval is
about 25 standard errors wide (Student's t with one degree of freedom), so "no
difference" would be certain whatever the methods do."""

LEVEL = 0.95
"""The confidence of each interval."""


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided `level` quantile of Student's t with `df` degrees of freedom:
    the half-width of an interval in standard errors (`scipy.stats.t`)."""
    if df < 1:
        raise ValueError(f"`df` must be at least 1, got {df}.")
    return float(scipy.stats.t.ppf(0.5 + level / 2, df))


@dataclasses.dataclass(frozen=True)
class Difference:
    """A paired difference in test error, method minus base, over seeds.

    **Attributes:**

    - `difference`: its mean over seeds.
    - `interval`: its 95% interval (Student's t, n - 1 degrees of freedom).
    - `half_width`: half the interval's width: the smallest difference this
        comparison could resolve.
    - `p_value`: two-sided, of the paired t test.
    - `verdict`: `"<method> better"` or `"<base> better"` where the interval
        excludes zero, else `"no difference larger than X"` with X the interval's
        farthest end from zero.
    - `holds_for_the_family`: whether the verdict holds after Holm's correction
        over every comparison of the summary (a "better" only).
    - `base_steps`, `base_gradient_evaluations`, `base_train_seconds`: the base run
        compared with.
    """

    difference: float
    interval: tuple[float, float]
    half_width: float
    p_value: float
    verdict: str
    holds_for_the_family: bool
    base_steps: int
    base_gradient_evaluations: int
    base_train_seconds: float


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A method against the base, at equal steps and at equal gradient
    evaluations (the base run for as many evaluations as the method used)."""

    equal_steps: Difference
    equal_gradient_evaluations: Difference


@dataclasses.dataclass(frozen=True)
class MethodRow:
    """A run at its end: the test error read from recalibrated statistics (mean,
    sample standard deviation and range over seeds), and read from the running and
    `tracking` statistics (means), the training loss (over the last tenth of the
    steps), the training time of the ensemble, and the time per step relative to
    the base's."""

    steps: int
    gradient_evaluations: int
    test_error: float
    test_error_std: float | None
    test_error_min: float
    test_error_max: float
    test_error_running: float
    test_error_tracking: float
    train_loss: float
    train_seconds: float
    time_per_step_vs_base: float


@dataclasses.dataclass(frozen=True)
class SAMSummary:
    """The summary of a [`eqx_norm.experiments.SAMResults`][]: `base` (the first
    method), `methods` and `base_continued` (the base's longer runs, each with the
    methods whose gradient evaluations it matches), `comparisons` per other method,
    `pays_for_itself` (the methods better than the base at equal gradient
    evaluations) and `no_verdicts` (why there are none, with too few seeds)."""

    base: str
    methods: dict[str, MethodRow]
    base_continued: dict[int, tuple[MethodRow, list[str]]]
    comparisons: dict[str, Comparison]
    pays_for_itself: list[str]
    no_verdicts: str | None

    def to_json(self) -> dict[str, Any]:
        """The summary as `results.json` holds it."""
        out = dataclasses.asdict(self)
        out["base_continued"] = {
            str(steps): {**dataclasses.asdict(row), "matches": matches}
            for steps, (row, matches) in self.base_continued.items()
        }
        return out


def _row(run: dict[str, np.ndarray], steps: int, base_time: float, spread: bool):
    final = np.asarray(run["test_error"])[-1]
    tail = max(1, steps // 10)
    return MethodRow(
        steps=steps,
        gradient_evaluations=int(run["gradient_evaluations"][-1]),
        test_error=float(np.mean(final)),
        test_error_std=float(np.std(final, ddof=1)) if spread else None,
        test_error_min=float(np.min(final)),
        test_error_max=float(np.max(final)),
        test_error_running=float(np.mean(run["test_error_running"][-1])),
        test_error_tracking=float(np.mean(run["test_error_tracking"][-1])),
        train_loss=float(np.mean(np.asarray(run["loss"])[:, -tail:])),
        train_seconds=float(run["train_seconds"][-1]),
        time_per_step_vs_base=float(run["seconds_per_step"]) / base_time,
    )


def _paired(errors, base_errors) -> tuple[float, float, float]:
    """The mean paired difference, its half-width and p-value."""
    d = np.asarray(errors, np.float64) - np.asarray(base_errors, np.float64)
    n = len(d)
    mean = float(np.mean(d))
    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    if se == 0:
        return mean, 0.0, 0.0 if mean else 1.0
    p = float(2 * scipy.stats.t.sf(abs(mean) / se, n - 1))
    return mean, t_quantile(n - 1) * se, p


def _verdict(mean: float, half: float, method: str, base: str) -> str:
    lo, hi = mean - half, mean + half
    if hi < 0:
        return f"{method} better"
    if lo > 0:
        return f"{base} better"
    return f"no difference larger than {max(abs(lo), abs(hi)):.3f}"


@dataclasses.dataclass
class SAMResults:
    """What the SAM comparison measured.

    **Attributes:**

    - `config`: the [`eqx_norm.experiments.SAMConfig`][] that ran.
    - `runs`: for each method, and for each longer run of the base
        (`"adam @ 3000 steps"`), a dict of NumPy arrays: `loss` (per seed and
        step), `eval_steps` (the steps after which the test error was read),
        `gradient_evaluations` (the gradients of one batch evaluated by then), the
        test error per evaluation and seed read four ways (`test_error`:
        recalibrated, what the verdicts use; `test_error_running`: the running
        statistics as training left them; `test_error_tracking`:
        `approach="tracking"`'s, kept beside them; `test_error_batch_statistics`:
        training mode on test batches of 1,000), `train_seconds` (per evaluation:
        the ensemble's training time so far, compilation excluded) and
        `seconds_per_step` (the median over its chunks of the ensemble's time per
        step).
    - `versions`: the versions of Python, JAX, Equinox, Optax and eqx_norm.
    - `seconds`: the wall time of the whole comparison.
    """

    config: SAMConfig
    runs: dict[str, dict[str, np.ndarray]]
    versions: dict[str, str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything, arrays as nested lists, with the
        summary."""
        return {
            "config": dataclasses.asdict(self.config),
            "versions": self.versions,
            "seconds": self.seconds,
            "summary": summary(self).to_json(),
            "runs": {
                name: {k: np.asarray(v).tolist() for k, v in run.items()}
                for name, run in self.runs.items()
            },
        }


def summary(results: SAMResults) -> SAMSummary:
    """The comparison's conclusions, from the recalibrated test errors of every run
    at its end. With fewer than `MIN_SEEDS_FOR_CLAIMS` seeds there are no verdicts
    (`comparisons` is empty and `no_verdicts` says why)."""
    config = results.config
    runs = results.runs
    base = config.methods[0]
    base_time = float(runs[base]["seconds_per_step"])
    spread = config.seeds >= 2
    methods = {
        m: _row(runs[m], config.steps, base_time, spread) for m in config.methods
    }
    lengths = base_lengths(config)
    base_continued = {}
    for steps in sorted(set(lengths.values()) - {config.steps}):
        matches = [m for m, length in lengths.items() if length == steps]
        row = _row(runs[continued(base, steps)], steps, base_time, spread)
        base_continued[steps] = (row, matches)
    if config.seeds < MIN_SEEDS_FOR_CLAIMS:
        reason = (
            f"{config.seeds} seed{'s' * (config.seeds != 1)}: no verdict (a paired "
            f"interval needs at least {MIN_SEEDS_FOR_CLAIMS} seeds to resolve "
            "anything; with 2 it is about 25 standard errors wide). Use --seeds."
        )
        return SAMSummary(base, methods, base_continued, {}, [], reason)
    raw = {}
    for method in config.methods[1:]:
        errors = runs[method]["test_error"][-1]
        steps = lengths[method]
        base_name = base if steps == config.steps else continued(base, steps)
        for kind, other in (("equal_steps", base), ("equal_evaluations", base_name)):
            run = runs[other]
            raw[method, kind] = (*_paired(errors, run["test_error"][-1]), other)
    holm = _holm({key: value[2] for key, value in raw.items()})
    comparisons = {}
    for method in config.methods[1:]:
        parts = []
        for kind in ("equal_steps", "equal_evaluations"):
            mean, half, p, other = raw[method, kind]
            verdict = _verdict(mean, half, method, base)
            run = runs[other]
            parts.append(
                Difference(
                    difference=mean,
                    interval=(mean - half, mean + half),
                    half_width=half,
                    p_value=p,
                    verdict=verdict,
                    holds_for_the_family=("better" in verdict)
                    and holm[method, kind] < 1 - LEVEL,
                    base_steps=int(run["eval_steps"][-1]),
                    base_gradient_evaluations=int(run["gradient_evaluations"][-1]),
                    base_train_seconds=float(run["train_seconds"][-1]),
                )
            )
        comparisons[method] = Comparison(*parts)
    paying = [
        m
        for m, c in comparisons.items()
        if c.equal_gradient_evaluations.verdict == f"{m} better"
    ]
    return SAMSummary(base, methods, base_continued, comparisons, paying, None)


def _holm(p_values: dict[Any, float]) -> dict[Any, float]:
    """Holm's step-down adjusted p-values over the family."""
    order = sorted(p_values, key=lambda key: p_values[key])
    m = len(order)
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        adjusted[key] = running
    return adjusted


def _difference(d: Difference) -> str:
    lo, hi = d.interval
    mark = " *" if d.holds_for_the_family else ""
    return f"{d.difference:+.4f} [{lo:+.4f}, {hi:+.4f}] {d.verdict}{mark}"


def sam_table(results: SAMResults) -> str:
    """The summary as plain text: per method the test error after the same steps
    (recalibrated; the running and tracking readings beside it), the base's longer
    runs with the methods they match, then the paired differences against the base
    and their verdicts at equal steps and at equal gradient evaluations, and which
    methods pay for themselves (with fewer than three seeds: no verdict, and
    why)."""
    s = summary(results)
    c = results.config
    base = s.base
    lines = [
        f"{'method':<22}{'grad evals':>11}{'test error':>12}{'± std':>9}"
        f"{'range':>17}{'running':>9}{'tracking':>10}{'train loss':>12}"
        f"{'wall s':>9}{'time/step':>11}"
    ]

    def line(name: str, row: MethodRow) -> str:
        if row.test_error_std is None:
            spread = f"{'-':>9}{'-':>17}"
        else:
            lo, hi = row.test_error_min, row.test_error_max
            spread = f"{row.test_error_std:>9.4f}{lo:>8.4f}-{hi:<8.4f}"
        return (
            f"{name:<22}{row.gradient_evaluations:>11}{row.test_error:>12.4f}"
            f"{spread}{row.test_error_running:>9.4f}{row.test_error_tracking:>10.4f}"
            f"{row.train_loss:>12.4f}{row.train_seconds:>9.1f}"
            f"{row.time_per_step_vs_base:>10.2f}x"
        )

    for method, row in s.methods.items():
        lines.append(line(method, row))
    for steps, (row, matches) in s.base_continued.items():
        lines.append(line(continued(base, steps), row) + f"  (= {', '.join(matches)})")
    rate = (
        "with cosine decay to 0 over each run"
        if c.schedule == "cosine"
        else "at a constant rate"
    )
    lines.append(
        f"\n{c.dataset}, {c.seeds} seed{'s' * (c.seeds != 1)} (one vmapped ensemble "
        f"per run), {c.steps} steps of batch {c.batch_size}, Adam {c.learning_rate} "
        f"{rate}"
        f"; {base} run again for as many gradient evaluations as the others. Test "
        f"error on the full test set with statistics recalibrated on "
        f"{c.recalibration_batches} training batches of 64 (mean over seeds, "
        "± sample standard deviation, range); running and tracking: the same "
        "weights read with the running statistics as training left them and with "
        "approach='tracking''s (means); wall s: the ensemble's training time, "
        f"compilation excluded; time per step relative to {base}."
    )
    if s.no_verdicts is not None:
        lines.append(s.no_verdicts)
        return "\n".join(lines)
    lines.append(
        f"\nRecalibrated test error, method - {base}, paired by seed: mean [95% "
        f"interval, Student's t over {c.seeds} seeds] verdict"
    )
    lines.append(f"{'method':<22}{'at equal steps':<54}at equal gradient evaluations")
    for method, comparison in s.comparisons.items():
        evals = comparison.equal_gradient_evaluations
        lines.append(
            f"{method:<22}{_difference(comparison.equal_steps):<62}"
            f"{_difference(evals)} ({base} at {evals.base_steps} steps)"
        )
    count = 2 * len(s.comparisons)
    halves = [
        d.half_width
        for c in s.comparisons.values()
        for d in (c.equal_steps, c.equal_gradient_evaluations)
    ]
    lines.append(
        f"\nEach interval's half-width is the smallest difference it resolves (here "
        f"{min(halves):.4f} to {max(halves):.4f}). {count} intervals are read at "
        f"95% each, so about {0.05 * count:.1f} would exclude zero by chance alone; "
        "* marks a verdict that still holds after Holm's correction over all "
        f"{count}."
    )
    paying = s.pays_for_itself
    lines.append(
        f"Pays for itself (better than {base} at equal gradient evaluations): "
        + (", ".join(paying) if paying else "none")
    )
    return "\n".join(lines)


def plot_sam(results: SAMResults, path: str | Path) -> Path:
    """Recalibrated test error against gradient evaluations (left) and against the
    ensemble's training wall time (right), one line per method (the base's longer
    runs as stars at their ends): each point the mean over seeds, its error bar the
    range over seeds; saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), sharey=True)
    colours = plt.get_cmap("tab10")
    config = results.config
    for i, (name, run) in enumerate(results.runs.items()):
        error = np.asarray(run["test_error"])
        mean = error.mean(axis=1)
        bars = [mean - error.min(axis=1), error.max(axis=1) - mean]
        xs = (run["gradient_evaluations"], run["train_seconds"])
        method = name if name in config.methods else None
        colour = colours(config.methods.index(method) if method else 0)
        marker = "o" if method else "*"
        for ax, x in zip(axes, xs):
            ax.errorbar(
                x,
                mean,
                yerr=bars,
                marker=marker,
                markersize=5 if method else 11,
                color=colour,
                capsize=3,
                ls="-" if method else "none",
                label=name,
            )
    axes[0].set_xlabel("gradient evaluations (forward-backward passes of a batch)")
    axes[1].set_xlabel(f"training wall time of the {config.seeds}-seed ensemble (s)")
    axes[0].set_ylabel("test error, recalibrated statistics")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(len(labels), 6),
        fontsize=8,
        title=marks_note(config.seeds, "points", "bars"),
        title_fontsize=8,
    )
    fig.suptitle(
        f"{config.dataset}: CNN with BatchNorm ({config.approach}), {config.seeds} "
        f"seeds, {config.steps} steps, Adam {config.learning_rate} "
        f"({config.schedule}); two-pass methods: {', '.join(TWO_PASSES)}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.13, 1, 0.96))
    return save_figure(fig, path, layout=False)


def save_sam_results(results: SAMResults, out: str | Path) -> dict[str, Path]:
    """Write `sam.png`, `results.json` and `table.txt` into the folder `out`.

    **Returns:**

    A dict from kind (`"plot"`, `"json"`, `"table"`) to the path written.
    """
    return save_outputs(
        out,
        results.to_json(),
        sam_table(results),
        lambda path: plot_sam(results, path),
        "sam.png",
    )
