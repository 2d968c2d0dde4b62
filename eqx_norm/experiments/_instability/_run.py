import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ... import APPROACHES, AbstractApproach, BatchNorm, sam
from .. import _training as training
from .._model import CNN
from .._settings import SettingError, check_names, check_shared, wrap

DEFAULT_APPROACHES = ("none", "batch", "ema", "adam-correction", "smooth-start")
"""The runs of the experiment by default ([`eqx_norm.experiments.Config`][]'s
`approaches`, the command's `--approaches`): the CNN without BatchNorm (`"none"`),
then with BatchNorm of approach `"batch"` (the reference of the claims), `"ema"`
(Equinox's original), `"adam-correction"` and `"smooth-start"`."""
KNOWN_APPROACHES = ("none",) + tuple(APPROACHES)
"""What `Config.approaches` may name: `"none"` (no BatchNorm) or an approach."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of one experiment; the defaults are the Equinox report's.

    **Attributes:**

    - `dataset`: `"digits"` (bundled, offline), `"mnist"` or `"fashion-mnist"`.
    - `approaches`: BatchNorm approaches to compare: names, `"none"` for the CNN
        without BatchNorm, or [`eqx_norm.Approach`][] objects (your own strategy,
        labelled by its class name).
    - `momentum`: the BatchNorm momentum.
    - `seeds`: how many seeds each approach runs (together, as one vmapped ensemble).
    - `steps`: training steps.
    - `batch_size`: examples per step.
    - `learning_rate`: Adam's learning rate.
    - `sam`: also run every approach with SAM around Adam, to compare.
    - `rho`: SAM's radius.
    - `adaptive`: use ASAM instead of SAM.
    - `data_dir`: a folder of IDX files to read instead of the data set's default.
    - `download`: for `"mnist"`, download missing files (checksummed).
    """

    dataset: str = "digits"
    approaches: tuple[str | AbstractApproach, ...] = DEFAULT_APPROACHES
    momentum: float = 0.99
    seeds: int = 3
    steps: int = 100
    batch_size: int = 64
    learning_rate: float = 3e-3
    sam: bool = False
    rho: float = 0.05
    adaptive: bool = False
    data_dir: str | None = None
    download: bool = False

    def __post_init__(self):
        """Every setting checked before any data is loaded or any step runs: a
        `eqx_norm.experiments.SettingError` (a `ValueError`) names the one that
        cannot run."""
        check_shared(self, self.seeds * self.steps * self.batch_size)
        approaches = self.approaches
        if isinstance(approaches, str) or not isinstance(approaches, (tuple, list)):
            raise SettingError(
                "approaches", f"must be a tuple, got {approaches!r}; e.g. ('batch',)."
            )
        for a in approaches:
            if isinstance(a, str) and a not in KNOWN_APPROACHES:
                raise SettingError(
                    "approaches",
                    f"holds the unknown approach {a!r}; choose from "
                    f"{KNOWN_APPROACHES}.",
                )
            if not isinstance(a, (str, AbstractApproach)):
                raise SettingError(
                    "approaches",
                    f"holds {a!r}; give names or `eqx_norm.Approach` objects.",
                )
        labels = tuple(approach_name(a) for a in approaches)
        check_names("approaches", labels, labels)
        wrap("momentum", BatchNorm, 1, "batch", momentum=self.momentum)
        for name in ("sam", "adaptive", "download"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(
                    name, f"must be a bool, got {getattr(self, name)!r}."
                )
        if self.adaptive and not self.sam:
            raise SettingError(
                "adaptive", "(ASAM) applies only with `sam` (--sam), which is off."
            )
        if self.download and self.dataset != "mnist":
            raise SettingError(
                "download", f"is for `dataset='mnist'` only, not {self.dataset!r}."
            )


@dataclasses.dataclass
class Results:
    """What an experiment measured.

    **Attributes:**

    - `config`: the [`eqx_norm.experiments.Config`][] that ran.
    - `runs`: for each run label (the approach, with `" + SAM"` or `" + ASAM"` for
        SAM runs), a dict of NumPy arrays: per step and seed (shape `(seeds, steps)`)
        `loss`, `grad_norm` (global L2 norm of the gradient), `grad_norm_max_leaf`
        (largest L2 norm of one parameter array), `norm_mean` and `norm_std` (of
        the BatchNorm output); per seed `test_accuracy` (inference mode, with the
        running statistics as training left them) and `test_accuracy_recalibrated`
        (with the statistics recomputed from 50 training batches by
        [`eqx_norm.recalibrate`][]: the weights' own accuracy, free of the running
        statistics' lag); and `seconds`, the wall time of the run, compilation
        included.
    - `versions`: the versions of Python, JAX, Equinox, Optax and eqx_norm.
    - `seconds`: the wall time of the whole experiment.
    """

    config: Config
    runs: dict[str, dict[str, Any]]
    versions: dict[str, str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything, arrays as nested lists."""
        config = dataclasses.asdict(self.config)
        config["approaches"] = [approach_name(a) for a in self.config.approaches]
        return {
            "config": config,
            "versions": self.versions,
            "seconds": self.seconds,
            "runs": {
                label: {k: np.asarray(v).tolist() for k, v in run.items()}
                for label, run in self.runs.items()
            },
        }


def _batch_indices(n: int, seeds: int, steps: int, batch_size: int) -> np.ndarray:
    """Shuffled epochs, one order per seed: shape (steps, seeds, batch_size)."""
    out = np.empty((seeds, steps * batch_size), np.int32)
    for s in range(seeds):
        rng = np.random.default_rng(s)
        epochs = math.ceil(steps * batch_size / n)
        out[s] = np.concatenate([rng.permutation(n) for _ in range(epochs)])[
            : steps * batch_size
        ]
    return out.reshape(seeds, steps, batch_size).transpose(1, 0, 2)


def _train_one(
    approach: str | AbstractApproach,
    use_sam: bool,
    config: Config,
    train: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array],
    on_steps: Callable[[int], object],
    recalibration: list[jax.Array],
) -> dict[str, Any]:
    """One approach, with or without SAM: `config.seeds` models trained side by side
    (vmapped), their per-step metrics and their test accuracy, with the running
    statistics and recalibrated from `recalibration`."""
    base = optax.adam(config.learning_rate)
    if use_sam:
        base = sam(base, rho=config.rho, adaptive=config.adaptive)
    optimizer, step = training.training_step(base)
    step = eqx.filter_vmap(step, in_axes=(eqx.if_array(0),) * 3 + (0, 0))
    start = time.perf_counter()
    ensemble = _ensemble(approach, optimizer, config)
    indices = _batch_indices(
        len(train[0]), config.seeds, config.steps, config.batch_size
    )
    chunk = training.chunk_size(config.steps)
    metrics = []
    for t in range(0, config.steps, chunk):
        ensemble, m = training.train_chunk(
            step, ensemble, indices[t : t + chunk], *train
        )
        metrics.append(jax.device_get(m))
        on_steps(chunk)
    run = {name: np.concatenate([m[name] for m in metrics]).T for name in metrics[0]}
    run["test_accuracy"] = training.accuracy(ensemble[:2], *test)
    states = training.recalibrated(ensemble[:2], recalibration)
    run["test_accuracy_recalibrated"] = training.accuracy((ensemble[0], states), *test)
    run["seconds"] = np.asarray(time.perf_counter() - start)
    return run


def _ensemble(approach: str | AbstractApproach, optimizer, config: Config):
    """`(models, states, optimizer states)`, one per seed, stacked along axis 0."""

    def make(key):
        model, state = eqx.nn.make_with_state(CNN)(approach, config.momentum, key=key)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        return model, state, opt_state

    keys = jnp.stack([jax.random.key(s) for s in range(config.seeds)])
    return eqx.filter_vmap(make)(keys)


def approach_name(approach: str | AbstractApproach) -> str:
    """A name for an approach: the string itself, or a strategy's class name."""
    return approach if isinstance(approach, str) else type(approach).__name__


def run_label(
    approach: str | AbstractApproach, use_sam: bool, adaptive: bool = False
) -> str:
    """The label of a run in [`eqx_norm.experiments.Results`][]`.runs`."""
    suffix = (" + ASAM" if adaptive else " + SAM") if use_sam else ""
    return approach_name(approach) + suffix


def run(config: Config = Config(), *, progress: bool = True) -> Results:
    """Train the CNN once per approach (and with SAM, if asked), all seeds of an
    approach together as one vmapped ensemble, and measure it step by step.

    **Arguments:**

    - `config`: an [`eqx_norm.experiments.Config`][].
    - `progress`: show a progress bar (needs `tqdm`, in the `experiment` extra).

    **Returns:**

    The [`eqx_norm.experiments.Results`][].
    """
    start = time.perf_counter()
    train, test = training.load_splits(config.dataset, config.data_dir, config.download)
    recalibration = training.recalibration_batches(train[0])
    plan: Sequence[tuple[str | AbstractApproach, bool]] = [
        (a, False) for a in config.approaches
    ]
    if config.sam:
        plan = [(a, s) for a in config.approaches for s in (False, True)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan) * config.steps, unit="step", desc="experiment")
    runs = {}
    for approach, use_sam in plan:
        label = run_label(approach, use_sam, config.adaptive)
        if bar is not None:
            bar.set_postfix_str(label)
        runs[label] = _train_one(
            approach,
            use_sam,
            config,
            train,
            test,
            bar.update if bar else lambda n: None,
            recalibration,
        )
    if bar is not None:
        bar.close()
    return Results(config, runs, training.versions(), time.perf_counter() - start)
