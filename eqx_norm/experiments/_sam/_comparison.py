"""The SAM comparison: the experiment's CNN with BatchNorm trained with the base
optimizer and each SAM variant over several seeds (one vmapped ensemble per run),
every test error read from recalibrated statistics, and compared at equal steps and
at equal gradient evaluations (the base run again for as many evaluations as the
method used, with its own schedule). The statistics of the comparison are in
`_summary.py`, its settings in `_config.py`."""

import math
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ... import APPROACHES, Batch, Tracking, looksam, msam, normalisation_mask, sam
from .. import _training as training
from .._model import CNN
from .._side_by_side import SideBySide, readings
from ._config import (
    READINGS,
    RUNNING,
    TRACKING,
    SAMConfig,
    base_lengths,
    continued,
    evaluation_steps,
    gradient_evaluations,
)
from ._summary import SAMResults


def _optimizer(method: str, config: SAMConfig, steps: int) -> Any:
    """The method around Adam, with the learning-rate schedule over `steps`."""
    rate = (
        optax.cosine_decay_schedule(config.learning_rate, steps)
        if config.schedule == "cosine"
        else config.learning_rate
    )
    adam = optax.adam(rate)
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


def _approach(config: SAMConfig) -> SideBySide:
    """The CNN's approach with `tracking`'s statistics kept beside its own."""
    own = Batch() if config.approach == "batch" else APPROACHES[config.approach]()
    return SideBySide(((RUNNING, own, 0.99), (TRACKING, Tracking(), 0.99)))


def _train(
    method: str,
    steps: int,
    config: SAMConfig,
    data,
    indices: np.ndarray,
    recalibration: list[jax.Array],
    on_steps: Callable[[int], object],
    evaluate_at: list[int],
) -> dict[str, np.ndarray]:
    """One method (or a run of the base) for `steps` steps, every seed at once."""
    train, test = data
    options = (
        {"micro_batches": config.micro_batches, "perturbation": "per-micro-batch"}
        if method == "sam-per-micro-batch"
        else {}
    )
    optimizer, step = training.training_step(
        _optimizer(method, config, steps), **options
    )
    step = training.ensemble_step(step)
    approach = _approach(config)

    def make(key):
        model, state = eqx.nn.make_with_state(CNN)(approach, key=key)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        return model, state, opt_state

    keys = jnp.stack([jax.random.key(s) for s in range(config.seeds)])
    ensemble = training.lockstep(eqx.filter_vmap(make)(keys))
    chunk = training.chunk_size(config.steps)
    # Compile before the clock starts, for every method alike.
    jax.block_until_ready(training.train_chunk(step, ensemble, indices[:chunk], *train))
    losses, times, evaluated = [], [], []
    errors: dict[str, list[np.ndarray]] = {key: [] for key in READINGS.values()}
    for t in range(0, steps, chunk):
        begin = time.perf_counter()
        ensemble, metrics = training.train_chunk(
            step, ensemble, indices[t : t + chunk], *train
        )
        losses.append(np.asarray(metrics["loss"]))  # waits for the chunk
        times.append(time.perf_counter() - begin)
        if t + chunk in evaluate_at:
            for key, values in _errors(ensemble, config, test, recalibration).items():
                errors[key].append(values)
            evaluated.append(len(times))
        on_steps(chunk)
    elapsed = np.cumsum(times)
    at = np.asarray(evaluated)
    return {
        "loss": np.concatenate(losses).T,
        "eval_steps": at * chunk,
        "gradient_evaluations": np.asarray(
            [gradient_evaluations(method, int(s), config.every) for s in at * chunk]
        ),
        **{key: np.stack(values) for key, values in errors.items()},
        "train_seconds": elapsed[at - 1],
        "seconds_per_step": np.asarray(np.median(times) / chunk),
    }


def _errors(ensemble, config: SAMConfig, test, recalibration) -> dict[str, Any]:
    """Each seed's test error read the four ways (`READINGS`)."""
    models, states, _ = ensemble
    per_seed: dict[str, list[float]] = {key: [] for key in READINGS.values()}

    def accuracy(model, state, inference):
        one = jax.tree.map(lambda a: a[None] if eqx.is_array(a) else a, (model, state))
        return float(training.accuracy(one, *test, inference=inference)[0])

    for i in range(config.seeds):
        model, state = jax.tree.map(
            lambda a: a[i] if eqx.is_array(a) else a, (models, states)
        )
        read = readings(model, state, recalibration, [RUNNING, TRACKING], accuracy)
        for reading, key in READINGS.items():
            per_seed[key].append(1 - read[reading])
    return {key: np.asarray(values) for key, values in per_seed.items()}


def run_sam_comparison(
    config: SAMConfig = SAMConfig(), *, progress: bool = True
) -> SAMResults:
    """Train the experiment's CNN (with BatchNorm) with each method, every seed as
    one vmapped ensemble; run the base (the first method) again for as many
    gradient evaluations as each method makes; read every test error from
    recalibrated statistics (and the running and `tracking` ones beside them).

    **Arguments:**

    - `config`: an [`eqx_norm.experiments.SAMConfig`][].
    - `progress`: show a progress bar (needs `tqdm`, in the `experiment` extra).

    **Returns:**

    The [`eqx_norm.experiments.SAMResults`][].
    """
    start = time.perf_counter()
    # Every optimizer first, so that a bad hyperparameter fails before any training.
    for method in config.methods:
        _optimizer(method, config, config.steps)
    data = training.load_splits(config.dataset, config.data_dir)
    recalibration = training.recalibration_batches(
        data[0][0], config.recalibration_batches
    )
    base = config.methods[0]
    lengths = base_lengths(config)
    plan = [(m, m, config.steps) for m in config.methods]
    for steps in sorted(set(lengths.values()) - {config.steps}):
        plan.append((continued(base, steps), base, steps))
    longest = max(steps for _, _, steps in plan)
    order = _batch_order(len(data[0][0]), config, longest)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(steps for _, _, steps in plan)
        bar = tqdm(total=total, unit="step", desc="sam comparison")
    runs = {}
    for name, method, steps in plan:
        if bar is not None:
            bar.set_postfix_str(name)
        at = evaluation_steps(
            steps, config.evaluations if name in config.methods else 1
        )
        runs[name] = _train(
            method,
            steps,
            config,
            data,
            order,
            recalibration,
            bar.update if bar else lambda n: None,
            at,
        )
    if bar is not None:
        bar.close()
    return SAMResults(config, runs, training.versions(), time.perf_counter() - start)


def _batch_order(n: int, config: SAMConfig, steps: int) -> np.ndarray:
    """Shuffled epochs, one order per seed, the same for every run (a shorter run
    takes its first steps): shape (steps, seeds, batch_size)."""
    out = np.empty((config.seeds, steps * config.batch_size), np.int32)
    for s in range(config.seeds):
        rng = np.random.default_rng(s)
        epochs = math.ceil(steps * config.batch_size / n)
        order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
        out[s] = order[: steps * config.batch_size]
    return out.reshape(config.seeds, steps, config.batch_size).transpose(1, 0, 2)
