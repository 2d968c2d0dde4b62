import dataclasses
import importlib.metadata
import math
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from .. import data
from .._approaches import APPROACHES, Approach
from .._sam import sam
from .._step import sam_step
from ._model import CNN, batch_forward, cross_entropy

DEFAULT_APPROACHES = ("none", "batch", "ema", "adam-correction", "smooth-start")


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
    approaches: tuple[str | Approach, ...] = DEFAULT_APPROACHES
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
        known = ("none",) + tuple(APPROACHES)
        for a in self.approaches:
            if isinstance(a, str) and a not in known:
                raise ValueError(f"Unknown approach {a!r}; choose from {known}.")
            if not isinstance(a, (str, Approach)):
                raise ValueError(
                    f"`approaches` holds {a!r}; give names or `eqx_norm.Approach` "
                    "objects."
                )
        if not self.approaches:
            raise ValueError("`approaches` is empty; name at least one.")
        for name in ("seeds", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1.")
        if self.batch_size < 2:
            raise ValueError("`batch_size` must be at least 2 for a batch variance.")
        if self.dataset not in data.DATASETS:
            raise ValueError(f"`dataset` must be one of {data.DATASETS}.")


@dataclasses.dataclass
class Results:
    """What an experiment measured.

    **Attributes:**

    - `config`: the [`eqx_norm.experiments.Config`][] that ran.
    - `runs`: for each run label (the approach, with `" + SAM"` or `" + ASAM"` for
        SAM runs), a dict of NumPy arrays: per step and seed (shape `(seeds, steps)`)
        `loss`, `grad_norm` (global L2 norm of the gradient), `grad_norm_max_leaf`
        (largest L2 norm of one parameter array), `norm_mean` and `norm_std` (of
        the BatchNorm output); per seed `test_accuracy`; and `seconds`, the wall
        time of the run, compilation included.
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


class _GradNorms(NamedTuple):
    global_norm: Float[Array, ""]
    max_leaf: Float[Array, ""]


def _record_grad_norms() -> optax.GradientTransformation:
    """Passes gradients through unchanged, keeping their norms in its state."""

    def init_fn(params):
        del params
        return _GradNorms(jnp.zeros(()), jnp.zeros(()))

    def update_fn(updates, state, params=None):
        del state, params
        leaves = [
            jnp.sqrt(jnp.sum(g.astype(jnp.float32) ** 2))
            for g in jax.tree.leaves(updates)
        ]
        return updates, _GradNorms(optax.tree.norm(updates), jnp.max(jnp.stack(leaves)))

    return optax.GradientTransformation(init_fn, update_fn)


def _grad_norms(opt_state) -> _GradNorms:
    """The gradient norms that `_record_grad_norms` kept, wherever they are in the
    chained optimizer state."""
    is_norms = lambda x: isinstance(x, _GradNorms)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_norms) if is_norms(x))


def _loss_fn(model, state, x, y):
    log_probs, state, out = batch_forward(model, state, x)
    return cross_entropy(log_probs, y), (state, (jnp.mean(out), jnp.std(out)))


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


def _chunk_size(steps: int, most: int = 10) -> int:
    return max(d for d in range(1, most + 1) if steps % d == 0)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("jax", "jaxlib", "equinox", "optax", "eqx_norm"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["backend"] = jax.default_backend()
    return out


def _train_one(
    approach: str | Approach,
    use_sam: bool,
    config: Config,
    train: tuple[jax.Array, jax.Array],
    test: tuple[jax.Array, jax.Array],
    on_steps: Callable[[int], object],
) -> dict[str, Any]:
    """One approach, with or without SAM: `config.seeds` models trained side by side
    (vmapped), their per-step metrics and their test accuracy."""
    base = optax.adam(config.learning_rate)
    if use_sam:
        base = sam(base, rho=config.rho, adaptive=config.adaptive)
    optimizer = optax.chain(_record_grad_norms(), base)
    step = eqx.filter_vmap(
        sam_step(_loss_fn, optimizer, has_aux=True),
        in_axes=(eqx.if_array(0),) * 3 + (0, 0),
    )
    start = time.perf_counter()
    ensemble = _ensemble(approach, optimizer, config)
    indices = _batch_indices(
        len(train[0]), config.seeds, config.steps, config.batch_size
    )
    chunk = _chunk_size(config.steps)
    metrics = []
    for t in range(0, config.steps, chunk):
        ensemble, m = _train_chunk(step, ensemble, indices[t : t + chunk], *train)
        metrics.append(jax.device_get(m))
        on_steps(chunk)
    run = {name: np.concatenate([m[name] for m in metrics]).T for name in metrics[0]}
    run["test_accuracy"] = _test_accuracy(ensemble[:2], *test)
    run["seconds"] = np.asarray(time.perf_counter() - start)
    return run


def _ensemble(approach: str | Approach, optimizer, config: Config):
    """`(models, states, optimizer states)`, one per seed, stacked along axis 0."""

    def make(key):
        model, state = eqx.nn.make_with_state(CNN)(approach, config.momentum, key=key)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        return model, state, opt_state

    keys = jnp.stack([jax.random.key(s) for s in range(config.seeds)])
    return eqx.filter_vmap(make)(keys)


@eqx.filter_jit
def _train_chunk(step, ensemble, indices, images, labels):
    """`len(indices)` steps of every seed's model (a `lax.scan`), and the metrics of
    each step."""
    dynamic, static = eqx.partition(ensemble, eqx.is_array)

    def body(dynamic, idx):
        model, state, opt_state = eqx.combine(dynamic, static)
        model, state, opt_state, loss, (mean, std) = step(
            model, state, opt_state, images[idx], labels[idx]
        )
        norms = _grad_norms(opt_state)
        dynamic = eqx.filter((model, state, opt_state), eqx.is_array)
        metrics = {
            "loss": loss,
            "grad_norm": norms.global_norm,
            "grad_norm_max_leaf": norms.max_leaf,
            "norm_mean": mean,
            "norm_std": std,
        }
        return dynamic, metrics

    dynamic, metrics = jax.lax.scan(body, dynamic, indices)
    return eqx.combine(dynamic, static), metrics


def _test_accuracy(models_and_states, images, labels, chunk: int = 1000):
    """Each seed's accuracy on the test set, in chunks of `chunk` images."""
    correct = np.zeros(len(jax.tree.leaves(models_and_states)[0]))
    for i in range(0, len(images), chunk):
        correct += np.asarray(
            _count_correct(
                models_and_states, images[i : i + chunk], labels[i : i + chunk]
            )
        )
    return correct / len(images)


@eqx.filter_jit
def _count_correct(models_and_states, images, labels):
    def one(model, state):
        model = eqx.nn.inference_mode(model)
        log_probs, _, _ = batch_forward(model, state, images)
        return jnp.sum(jnp.argmax(log_probs, axis=1) == labels)

    return eqx.filter_vmap(one)(*models_and_states)


def approach_name(approach: str | Approach) -> str:
    """A name for an approach: the string itself, or a strategy's class name."""
    return approach if isinstance(approach, str) else type(approach).__name__


def run_label(approach: str | Approach, use_sam: bool, adaptive: bool = False) -> str:
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
    train = data.load_dataset(
        config.dataset,
        "train",
        folder=config.data_dir,
        download_missing=config.download,
    )
    test = data.load_dataset(config.dataset, "test", folder=config.data_dir)
    train = (jnp.asarray(train[0]), jnp.asarray(train[1]))
    test = (jnp.asarray(test[0]), jnp.asarray(test[1]))
    plan: Sequence[tuple[str | Approach, bool]] = [
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
        )
    if bar is not None:
        bar.close()
    return Results(config, runs, _versions(), time.perf_counter() - start)
