import json
from pathlib import Path
from typing import Any

import numpy as np

from .._figures import marks_note, save_figure
from ._run import Results

EARLY_STEPS = 10
FINAL_STEPS = 20
SPIKE_FACTOR = 2.5  # early peak at most this many times batch's: no spike


def claims(results: Results, reference: str = "batch") -> dict[str, dict[str, Any]]:
    """The figures behind the claims of the Equinox BatchNorm-instability report.

    For each run: the early peak gradient norm (the largest global gradient norm in
    steps 1-10, averaged over seeds) and the final loss (the mean training loss over
    the last 20 steps, averaged over seeds), both also relative to the `reference`
    run; whether the early peak is within 2.5 times the reference's (no spike); and
    the mean test accuracy, read with the running statistics as training left them
    and with recalibrated statistics (the weights' own).

    **Arguments:**

    - `results`: what [`eqx_norm.experiments.run`][] returned.
    - `reference`: the run label to compare with.

    **Returns:**

    A dict from run label to a dict of figures.
    """
    out = {}
    ref = results.runs.get(reference)
    early = min(EARLY_STEPS, results.config.steps)
    final = min(FINAL_STEPS, results.config.steps)

    def peak(run):
        return float(np.mean(np.max(run["grad_norm"][:, :early], axis=1)))

    def last(run):
        return float(np.mean(run["loss"][:, -final:]))

    for label, run in results.runs.items():
        row = {
            "early_peak_grad_norm": peak(run),
            "final_loss": last(run),
            "test_accuracy": float(np.mean(run["test_accuracy"])),
            "test_accuracy_recalibrated": float(
                np.mean(run["test_accuracy_recalibrated"])
            ),
        }
        if ref is not None:
            row["early_peak_vs_reference"] = peak(run) / peak(ref)
            row["final_loss_vs_reference"] = last(run) / last(ref)
            row["no_spike"] = bool(peak(run) / peak(ref) <= SPIKE_FACTOR)
        out[label] = row
    return out


def claims_table(results: Results, reference: str = "batch") -> str:
    """The claims as a plain-text table, with the verdicts of the report's claims."""
    rows = claims(results, reference)
    has_ref = reference in results.runs
    head = (
        f"{'run':<24} {'early peak |g|':>15} {'final loss':>11} {'test acc':>9} "
        f"{'recal acc':>9}"
    )
    if has_ref:
        head += f" {'peak/' + reference:>11} {'loss/' + reference:>11}"
    lines = [head, "-" * len(head)]
    for label, r in rows.items():
        line = (
            f"{label:<24} {r['early_peak_grad_norm']:>15.3f} {r['final_loss']:>11.4f}"
            f" {r['test_accuracy']:>9.3f} {r['test_accuracy_recalibrated']:>9.3f}"
        )
        if has_ref:
            line += (
                f" {r['early_peak_vs_reference']:>11.2f}"
                f" {r['final_loss_vs_reference']:>11.2f}"
            )
        lines.append(line)
    lines.append("")
    lines.append(
        "test acc: inference mode with the running statistics as training left "
        "them (their lag behind the weights included); recal acc: after "
        "eqx_norm.recalibrate on 50 training batches (the weights' own accuracy)."
    )
    if has_ref:
        lines.append(
            f"Early = steps 1-{EARLY_STEPS}, final = last {FINAL_STEPS} steps, means "
            f"over {results.config.seeds} seeds; no spike = early peak at most "
            f"{SPIKE_FACTOR}x {reference}'s."
        )
        for label, r in rows.items():
            if label != reference:
                verdict = "no spike" if r["no_spike"] else "SPIKE"
                lines.append(
                    f"  {label}: early peak {r['early_peak_vs_reference']:.2f}x "
                    f"{reference} ({verdict}); final loss "
                    f"{r['final_loss_vs_reference']:.2f}x {reference}"
                )
    return "\n".join(lines)


def accuracy_limits(accuracy: list[np.ndarray]) -> tuple[float, float]:
    """The y-limits of the accuracy panel: every seed's accuracy, with a margin of a
    tenth of their spread (at least half a point), within [0, 1]."""
    lo = float(min(a.min() for a in accuracy))
    hi = float(max(a.max() for a in accuracy))
    pad = max(0.1 * (hi - lo), 0.005)
    return max(0.0, lo - pad), min(1.0, hi + pad)


def plot(results: Results, path: str | Path) -> Path:
    """Plot the gradient norms, training loss, BatchNorm output statistics and test
    accuracy of every run, one colour per run, the line the median over seeds and the
    band their range.

    **Arguments:**

    - `results`: what [`eqx_norm.experiments.run`][] returned.
    - `path`: the PNG file to write.

    **Returns:**

    The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("grad_norm", "gradient L2 norm (global)", True),
        ("grad_norm_max_leaf", "gradient L2 norm (largest leaf)", True),
        ("loss", "training loss", True),
        ("norm_mean", "BatchNorm output mean", False),
        ("norm_std", "BatchNorm output std", False),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    colours = plt.get_cmap("tab10")
    steps = np.arange(1, results.config.steps + 1)
    for ax, (key, title, log) in zip(axes.flat, panels):
        for i, (label, run) in enumerate(results.runs.items()):
            values = np.asarray(run[key])
            ax.plot(steps, np.median(values, 0), color=colours(i), label=label, lw=1.4)
            ax.fill_between(
                steps, values.min(0), values.max(0), color=colours(i), alpha=0.2, lw=0
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(
        fontsize=8,
        title=marks_note(results.config.seeds, "lines", "bands", "median"),
        title_fontsize=8,
    )
    ax = axes.flat[5]
    labels = list(results.runs)
    running = [np.asarray(results.runs[k]["test_accuracy"]) for k in labels]
    recal = [np.asarray(results.runs[k]["test_accuracy_recalibrated"]) for k in labels]
    # Points with the range over seeds, on an axis fitted to them: the runs differ
    # by a few points of accuracy, which an axis from 0 to 1 would hide. Filled:
    # the running statistics; hollow: recalibrated (the weights' own).
    for i, (a, b) in enumerate(zip(running, recal)):
        for offset, values, face in ((-0.12, a, colours(i)), (0.12, b, "white")):
            ax.errorbar(
                [i + offset],
                [values.mean()],
                yerr=[[values.mean() - values.min()], [values.max() - values.mean()]],
                fmt="o",
                color=colours(i),
                markerfacecolor=face,
                capsize=4,
            )
    accuracy = running + recal
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylim(*accuracy_limits(accuracy))
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("test accuracy: running (filled), recalibrated (hollow)")
    ax.set_ylabel(marks_note(results.config.seeds, "points", "bars"), fontsize=8)
    c = results.config
    fig.suptitle(
        f"{c.dataset}: momentum {c.momentum}, {c.seeds} seeds, {c.steps} steps, "
        f"batch {c.batch_size}, Adam {c.learning_rate}"
    )
    return save_figure(fig, path)


def save_results(results: Results, out: str | Path) -> dict[str, Path]:
    """Write `instability.png`, `results.json` (every figure, the claims, the
    configuration and versions) and `claims.txt` into the folder `out`.

    **Returns:**

    A dict from kind (`"plot"`, `"json"`, `"claims"`) to the path written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = results.to_json()
    payload["claims"] = claims(results)
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "claims.txt").write_text(claims_table(results) + "\n")
    return {
        "plot": plot(results, out / "instability.png"),
        "json": out / "results.json",
        "claims": out / "claims.txt",
    }
