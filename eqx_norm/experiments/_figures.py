"""What the experiments' figures share: the note saying what their marks are, and
writing a figure out."""

from pathlib import Path


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
