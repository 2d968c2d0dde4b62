"""What the experiments' outputs share: the note saying what their marks are,
writing a figure out, and a run's folder of figure, results and table."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def marks_note(seeds: int, centre: str, spread: str, statistic: str = "mean") -> str:
    """What a figure's marks are, for its legend: `centre` the `statistic` over the
    seeds, `spread` their range."""
    if seeds < 2:
        return f"{centre}: the one seed; no {spread} (a spread needs two seeds)"
    return f"{centre}: {statistic} over {seeds} seeds; {spread}: range (min to max)"


def save_figure(fig, path: str | Path, *, layout: bool = True) -> Path:
    """Lay out `fig` (unless `layout` is false: laid out already), write it to
    `path` (making its folder) and close it."""
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_outputs(
    out: str | Path,
    payload: dict[str, Any],
    table: str,
    plot: Callable[[Path], Path],
    figure: str,
) -> dict[str, Path]:
    """Write `results.json` (the `payload`), `table.txt` and the figure `figure`
    (drawn by `plot(path)`) into the folder `out`; return a dict from kind
    (`"plot"`, `"json"`, `"table"`) to the path written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "table.txt").write_text(table + "\n")
    return {
        "plot": plot(out / figure),
        "json": out / "results.json",
        "table": out / "table.txt",
    }
