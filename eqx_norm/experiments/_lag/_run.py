"""The lag experiment: how far inference with running statistics falls behind the
model it evaluates, in four regimes, for fixed momenta, `approach="tracking"` and
recalibrated statistics.

Every reading compared here trains as `approach="batch"` does (the batch's own
statistics normalise each training batch), so one training run per regime and
seed serves them all: each step records every BatchNorm layer's batch statistics
(the recording pass that `recalibrate` uses), and each approach's running
statistics are updated from them by the approach itself, side by side."""

import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ... import AbstractApproach, Batch, Tracking, sam_step
from .. import _training as training
from .._side_by_side import SideBySide, readings
from ._config import REGIMES, TRACKING, LagConfig, LagResults, running_label
from ._models import MODELS


def side_by_side(config: LagConfig) -> SideBySide:
    """The approaches whose running statistics the experiment reads."""
    compared: list[tuple[str, AbstractApproach, float]] = [
        (running_label(m), Batch(), m) for m in config.momenta
    ]
    compared.append((TRACKING, Tracking(), config.momenta[0]))
    return SideBySide(tuple(compared))


def _loss(model, state, x, y):
    logits, state = jax.vmap(
        model, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
    )(x, state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


@eqx.filter_jit
def _chunk(step, trio, indices, images, labels):
    dynamic, static = eqx.partition(trio, eqx.is_array)

    def body(dynamic, idx):
        model, state, opt_state = eqx.combine(dynamic, static)
        model, state, opt_state, loss = step(
            model, state, opt_state, images[idx], labels[idx]
        )
        return eqx.filter((model, state, opt_state), eqx.is_array), loss

    # Unrolled: in a rolled loop XLA:CPU runs the residual CNN's training step
    # about six times slower than as straight-line code (measured: 127 ms a step
    # against 17 ms).
    dynamic, losses = jax.lax.scan(body, dynamic, indices, unroll=True)
    return eqx.combine(dynamic, static), losses


@eqx.filter_jit
def _correct(model, state, images, labels, inference: bool):
    model = eqx.nn.inference_mode(model, inference)
    logits, _ = jax.vmap(
        model, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
    )(images, state)
    return jnp.sum(jnp.argmax(logits, axis=1) == labels)


def _accuracy(model, state, test, inference: bool, chunk: int = 1000) -> float:
    """Test accuracy, in chunks of `chunk` images: in training mode each chunk is
    normalised with its own statistics."""
    images, labels = test
    correct = 0
    for i in range(0, len(images), chunk):
        correct += int(
            _correct(
                model, state, images[i : i + chunk], labels[i : i + chunk], inference
            )
        )
    return correct / len(images)


def _readings(model, state, test, recal, labels: list[str]) -> dict[str, float]:
    """The test accuracy of the model (trained with `SideBySide`) read with batch
    statistics, with each kept approach's running statistics, and recalibrated."""

    def accuracy(model, state, inference):
        return _accuracy(model, state, test, inference=inference)

    return readings(model, state, recal, labels, accuracy)


def evaluation_steps(steps: int, evaluations: int) -> list[int]:
    """After which steps the test accuracy is read: `evaluations` ends of chunks,
    spread evenly, the last at `steps`."""
    chunk = training.chunk_size(steps)
    chunks = steps // chunk
    return sorted(
        {chunk * round(chunks * (k + 1) / evaluations) for k in range(evaluations)}
    )


def _run_regime(
    name: str, config: LagConfig, train, test, recal, on_steps: Callable[[int], Any]
) -> dict[str, Any]:
    regime = REGIMES[name]
    steps = regime.steps if config.steps is None else config.steps
    schedule = (
        optax.cosine_decay_schedule(config.learning_rate, steps)
        if regime.schedule == "cosine"
        else config.learning_rate
    )
    optimizer = optax.adam(schedule)
    step = sam_step(_loss, optimizer)
    approach = side_by_side(config)
    labels = [label for label, _, _ in approach.compared]
    chunk = training.chunk_size(steps)
    evals = evaluation_steps(steps, config.evaluations)
    readings: dict[str, list[list[float]]] = {}
    losses = []
    for seed in range(config.seeds):
        model, state = eqx.nn.make_with_state(MODELS[regime.model])(
            approach, key=jax.random.key(seed)
        )
        trio = (model, state, optimizer.init(eqx.filter(model, eqx.is_inexact_array)))
        rng = np.random.default_rng(seed)
        n = len(train[0])
        order = np.concatenate(
            [rng.permutation(n) for _ in range(-(-steps * regime.batch_size // n))]
        )
        order = order[: steps * regime.batch_size].reshape(steps, -1)
        seed_readings: dict[str, list[float]] = {}
        seed_losses = []
        for t in range(0, steps, chunk):
            trio, loss = _chunk(step, trio, order[t : t + chunk], *train)
            seed_losses.append(np.asarray(loss))
            on_steps(chunk)
            if t + chunk in evals:
                read = _readings(trio[0], trio[1], test, recal, labels)
                for label, value in read.items():
                    seed_readings.setdefault(label, []).append(value)
        for label, values in seed_readings.items():
            readings.setdefault(label, []).append(values)
        losses.append(np.concatenate(seed_losses))
    return {
        "eval_steps": np.asarray(evals),
        "loss": np.stack(losses),
        "accuracy": {k: np.asarray(v) for k, v in readings.items()},
    }


def run_lag(config: LagConfig = LagConfig(), *, progress: bool = True) -> LagResults:
    """Train each regime's model once per seed with batch statistics, and read its
    test accuracy during training with the batch's own statistics, with each
    approach's running statistics and recalibrated.

    **Arguments:**

    - `config`: a [`eqx_norm.experiments.LagConfig`][].
    - `progress`: show a progress bar (needs `tqdm`, in the `experiment` extra).

    **Returns:**

    The [`eqx_norm.experiments.LagResults`][].
    """
    from .._settings import DataNotFoundError, check_data_folder

    start = time.perf_counter()
    dataset = config.dataset
    try:
        check_data_folder(dataset, config.data_dir)
    except DataNotFoundError:
        if not config.falls_back:
            raise
        dataset = "digits"  # Fashion-MNIST is not installed: the bundled digits
    train, test = training.load_splits(
        dataset, config.data_dir if dataset == config.dataset else None
    )
    recal = training.recalibration_batches(train[0], config.recalibration_batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = config.seeds * sum(
            REGIMES[r].steps if config.steps is None else config.steps
            for r in config.regimes
        )
        bar = tqdm(total=total, unit="step", desc="lag")
    runs = {}
    for name in config.regimes:
        if bar is not None:
            bar.set_postfix_str(name)
        runs[name] = _run_regime(
            name, config, train, test, recal, bar.update if bar else lambda n: None
        )
    if bar is not None:
        bar.close()
    return LagResults(
        config, dataset, runs, training.versions(), time.perf_counter() - start
    )
