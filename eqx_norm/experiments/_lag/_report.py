"""The lag experiment's summary, table and figure."""

from typing import Any

import numpy as np

from .._figures import marks_note, save_figure, save_outputs
from .._side_by_side import BATCH_STATISTICS, RECALIBRATED
from ._config import REGIMES, TRACKING, LagResults, lag_summary, running_label


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
    return save_outputs(
        out,
        results.to_json(),
        lag_table(results),
        lambda path: plot_lag(results, path),
        "lag.png",
    )
