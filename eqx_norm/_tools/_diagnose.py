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
    - `mismatch`: how far the statistics inference normalises with are from those
        training normalises this batch with, against how far this batch's own
        sampling noise would put them: about 1 or below where the running
        statistics agree with the weights (see [`eqx_norm.diagnose`][]); NaN where
        the batch was not finite.
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
    mismatch: float

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

    @property
    def lagging(self) -> tuple[LayerDiagnosis, ...]:
        """The layers whose inference statistics are further from this batch's than
        its sampling noise explains (`mismatch` above `MISMATCH`)."""
        return tuple(d for d in self.layers if d.mismatch > MISMATCH)

    @property
    def verdict(self) -> str | None:
        """In words, where inference disagrees with training by more than the
        batch's noise explains, and the fixes; `None` where it does not."""
        lagging = self.lagging
        if not lagging:
            return None
        worst = max(lagging, key=lambda d: d.mismatch)
        paths = ", ".join(d.path for d in lagging[:5])
        more = f" and {len(lagging) - 5} more" if len(lagging) > 5 else ""
        return (
            f"Inference disagrees with training at {len(lagging)} of "
            f"{len(self.layers)} BatchNorm layers ({paths}{more}): their inference "
            f"statistics are up to {worst.mismatch:.0f} times further from this "
            "batch's than its own sampling noise explains (at "
            f"{worst.path}). That is what running statistics that lag the weights "
            "look like (a constant or high learning rate, evaluation during "
            "training, a short fine-tuning run), or statistics from other data. "
            "Fixes: recompute them from the weights with `state = "
            "eqx_norm.recalibrate(model, state, batches)` (exact; a pass over some "
            "training batches, before evaluating or serving), or train with "
            '`approach="tracking"`, whose running statistics keep up with the '
            'weights (`eqx_norm.set_approach(model, "tracking")`, then `state = '
            "eqx_norm.match_state(model, state)`)."
        )

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
        if self.verdict is not None:
            lines.append("")
            lines.append(self.verdict)
        return "\n".join(lines)


MISMATCH = 8.0
"""The `mismatch` above which [`eqx_norm.diagnose`][] gives its verdict: eight times
what sampling noise gives on average (it scatters about 1, up to about 3 over a few
channels), where running statistics that lag moving weights give tens to
thousands."""


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

    Whether that gap is more than noise: training normalises a channel with
    $(\\mu_t, v_t)$ (for `"batch"`, this batch's statistics) and inference with
    $(\\mu_i, v_i)$; their discrepancy, twice the Kullback-Leibler divergence of the
    two normal distributions to second order, averaged over the channels,

    $$D = \\frac{1}{C} \\sum_\\text{channels} \\left(
    \\frac{(\\mu_t - \\mu_i)^2}{v_t + \\varepsilon} +
    \\frac{(v_t - v_i)^2}{2 (v_t + \\varepsilon)^2} \\right),$$

    is compared with what the batch's own sampling noise gives it: the batch is
    split into $k$ groups (4, or 2 for a batch of 4 to 7 examples), each passed
    through the model on its own (so that the noise is that of real batches, every
    layer before normalising them), and the variance of the groups' statistics
    over $k$ estimates the variance of the whole batch's, in the same units. The
    layer's `mismatch` is their ratio: about 1 where the running statistics are
    those of the current weights; above 8 the layer counts as lagging, which the
    [`eqx_norm.Diagnosis`][] says in words (`verdict`), naming
    [`eqx_norm.recalibrate`][] and `approach="tracking"` as the fixes. A batch of
    fewer than 4 examples has no groups to measure the noise with: `mismatch` is
    NaN and there is no verdict.

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
    x = first_input(batch)
    recorded = record_batch_statistics(model, state, x, "diagnose", None)
    groups = _groups(model, state, x)
    out = []
    for i, ((path, bn), stats) in enumerate(zip(layers, recorded)):
        running = bn._running(state)
        run_mean, run_var = (np.asarray(a, np.float64) for a in bn.statistics(state))
        if stats is None:
            nan = np.full(bn.input_size, np.nan)
            batch_mean = batch_var = gap = nan
            mismatch = float("nan")
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
            mismatch = _mismatch(t_mean, t_var, run_mean, run_var, bn.eps, groups[i])
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
                mismatch=mismatch,
            )
        )
    return Diagnosis(tuple(out))


def _groups(model, state, x) -> list[list[Any] | None]:
    """Each layer's statistics of the batch `x` split into groups (four, or two for
    a batch of 4 to 7 examples), each group passed through the model on its own;
    `None` for a batch of fewer than 4 examples, or where a group's statistics are
    not finite."""
    count = int(np.shape(x)[0])
    layers = batch_norms(model)
    if count < 4:
        return [None] * len(layers)
    k = 4 if count >= 8 else 2
    bounds = [count * g // k for g in range(k + 1)]
    try:
        parts = [
            record_batch_statistics(model, state, x[lo:hi], "diagnose", None)
            for lo, hi in zip(bounds, bounds[1:])
        ]
    except ValueError:  # a group with one value per channel
        return [None] * len(layers)
    return [
        None if any(s is None for s in stats) else list(stats) for stats in zip(*parts)
    ]


def _mismatch(t_mean, t_var, run_mean, run_var, eps: float, groups) -> float:
    """The discrepancy (twice the Kullback-Leibler divergence to second order,
    averaged over channels) between the normal distributions that training and
    inference normalise a channel with, over what sampling noise alone gives the
    whole batch's statistics: the variance of the groups' statistics over the
    number of groups. NaN without groups."""
    if groups is None:
        return float("nan")
    scale = t_var + eps
    scale = np.where(scale > 0, scale, 1)
    k = len(groups)
    means = np.stack([np.asarray(g.mean, np.float64) for g in groups])
    variances = np.stack([np.asarray(g.var, np.float64) for g in groups])
    noise = float(
        np.mean(
            means.var(axis=0, ddof=1) / k / scale
            + variances.var(axis=0, ddof=1) / k / (2 * scale**2)
        )
    )
    gap = float(
        np.mean(
            (t_mean - run_mean) ** 2 / scale + (t_var - run_var) ** 2 / (2 * scale**2)
        )
    )
    if noise == 0:
        return 0.0 if gap == 0 else float("inf")
    return gap / noise
