import dataclasses
from typing import Any

import equinox as eqx
import numpy as np
from jaxtyping import PyTree

from ._record import first_input, record_batch_statistics
from ._walk import batch_norms, no_batch_norm


@dataclasses.dataclass(frozen=True)
class LayerDiagnosis:
    """What [`eqx_norm.diagnose`][] found at one BatchNorm layer.

    **Attributes:**

    - `path`: where the layer is in the model (e.g. `".layers[1]"`).
    - `approach`: the layer's approach (its class name).
    - `batch_mean`, `batch_var`: this batch's per-channel statistics (NaN where the
        batch was not finite).
    - `running_mean`, `running_var`: the statistics inference uses now.
    - `dead_channels`: channels whose running variance is below `dead_var` (they
        divide by about $\\sqrt{\\varepsilon}$ in inference).
    - `nonfinite_channels`: channels whose running mean or variance is not finite.
    - `gap`: per channel, the root-mean-square difference over the batch between the
        layer's training-mode and inference-mode outputs on its actual input.
    """

    path: str
    approach: str
    batch_mean: np.ndarray
    batch_var: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    dead_channels: np.ndarray
    nonfinite_channels: np.ndarray
    gap: np.ndarray

    @property
    def max_gap(self) -> float:
        """The largest per-channel train/inference gap (NaN if any is NaN)."""
        return float(np.max(self.gap)) if self.gap.size else 0.0


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The result of [`eqx_norm.diagnose`][]: one [`eqx_norm.LayerDiagnosis`][] per
    BatchNorm layer. `print` it for a table."""

    layers: tuple[LayerDiagnosis, ...]

    def __getitem__(self, i: int) -> LayerDiagnosis:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        head = (
            f"{'layer':<24} {'approach':<16} {'C':>5} {'|mean shift|/std':>17} "
            f"{'var ratio':>10} {'dead':>5} {'non-finite':>10} {'train/infer gap':>16}"
        )
        lines = [head, "-" * len(head)]
        for d in self.layers:
            with np.errstate(all="ignore"):
                shift = np.abs(d.batch_mean - d.running_mean) / np.sqrt(d.batch_var)
                ratio = d.running_var / d.batch_var
            worst = np.nanmax(shift) if np.isfinite(shift).any() else float("nan")
            lines.append(
                f"{d.path:<24} {d.approach:<16} {d.running_mean.size:>5} "
                f"{worst:>17.3g} "
                f"{_range(ratio):>10} {d.dead_channels.size:>5} "
                f"{d.nonfinite_channels.size:>10} {d.max_gap:>16.3g}"
            )
        lines.append("")
        lines.append(
            "|mean shift|/std: largest |batch mean - running mean| in batch standard "
            "deviations; var ratio: range of running/batch variance; gap: largest "
            "RMS difference of training- and inference-mode outputs."
        )
        for d in self.layers:
            if d.dead_channels.size or d.nonfinite_channels.size:
                lines.append(
                    f"{d.path}: dead channels {d.dead_channels.tolist()[:10]}, "
                    f"non-finite {d.nonfinite_channels.tolist()[:10]}; "
                    "`eqx_norm.recalibrate` recomputes the statistics from data."
                )
        return "\n".join(lines)


def _range(x: np.ndarray) -> str:
    finite = x[np.isfinite(x)]
    if not finite.size:
        return "nan"
    return f"{finite.min():.2g}-{finite.max():.2g}"


def diagnose(
    model: PyTree, state: eqx.nn.State, batch: Any, *, dead_var: float = 1e-8
) -> Diagnosis:
    """Check every [`eqx_norm.BatchNorm`][] of a model against a batch: its batch
    statistics against its running statistics, dead or non-finite channels, and the
    gap between its training-mode and inference-mode outputs, from one
    training-mode forward pass (the state is not changed).

    The gap of a layer is computed from its input's batch statistics: training and
    inference apply affine maps $a_t x + c_t$ and $a_i x + c_i$ to each channel, so
    the root-mean-square difference over the batch is
    $\\sqrt{(a_t - a_i)^2 v + ((a_t - a_i)\\mu + c_t - c_i)^2}$.

    ```python
    print(eqx_norm.diagnose(model, state, x))
    ```

    **Arguments:**

    - `model`: a model holding `eqx_norm.BatchNorm` layers, called per example as
        `model(x, state)` returning the new state among its outputs.
    - `state`: its state.
    - `batch`: an input batch (or a tuple whose first element is one).
    - `dead_var`: running variances below this count as dead channels.

    **Returns:**

    A [`eqx_norm.Diagnosis`][].

    **Raises:**

    A `ValueError` if the model has no `eqx_norm.BatchNorm`.
    """
    layers = batch_norms(model)
    if not layers:
        raise no_batch_norm("diagnose")
    recorded = record_batch_statistics(
        model, state, first_input(batch), "diagnose", None
    )
    out = []
    for (path, bn), stats in zip(layers, recorded):
        running = state.get(bn.state_index)
        run_mean, run_var = (np.asarray(a, np.float64) for a in bn.statistics(state))
        if stats is None:
            nan = np.full(bn.input_size, np.nan)
            batch_mean = batch_var = gap = nan
        else:
            batch_mean = np.asarray(stats.mean, np.float64)
            batch_var = np.asarray(stats.var, np.float64)
            t_mean, t_var, _ = bn.approach.train(stats, running, bn.momentum, bn.eps)
            t_mean, t_var = (
                np.asarray(t_mean, np.float64),
                np.asarray(t_var, np.float64),
            )
            w = 1.0 if bn.weight is None else np.asarray(bn.weight, np.float64)
            a_t, a_i = w / np.sqrt(t_var + bn.eps), w / np.sqrt(run_var + bn.eps)
            c_t, c_i = -t_mean * a_t, -run_mean * a_i
            da = a_t - a_i
            gap = np.sqrt(da**2 * batch_var + (da * batch_mean + c_t - c_i) ** 2)
        finite = np.isfinite(run_mean) & np.isfinite(run_var)
        out.append(
            LayerDiagnosis(
                path=path,
                approach=type(bn.approach).__name__,
                batch_mean=batch_mean,
                batch_var=batch_var,
                running_mean=run_mean,
                running_var=run_var,
                dead_channels=np.flatnonzero(finite & (run_var < dead_var)),
                nonfinite_channels=np.flatnonzero(~finite),
                gap=gap,
            )
        )
    return Diagnosis(tuple(out))
