"""What the instability experiment and the SAM comparison share: the data, the loss
with the BatchNorm output's statistics, the recorded gradient norms, training in
jitted chunks of steps, the test accuracy and the versions that ran."""

import importlib.metadata
import platform
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from .. import batch_norms, data, recalibrate, sam_step
from ._model import batch_forward, cross_entropy
from ._settings import check_data_folder


class GradNorms(NamedTuple):
    """The state of `record_grad_norms`: the global L2 norm of the last
    gradient, and the largest L2 norm of one of its arrays."""

    global_norm: Float[Array, ""]
    max_leaf: Float[Array, ""]


def record_grad_norms() -> optax.GradientTransformation:
    """Passes gradients through unchanged, keeping their norms in its state."""

    def init_fn(params):
        del params
        return GradNorms(jnp.zeros(()), jnp.zeros(()))

    def update_fn(updates, state, params=None):
        del state, params
        leaves = [
            jnp.sqrt(jnp.sum(g.astype(jnp.float32) ** 2))
            for g in jax.tree.leaves(updates)
        ]
        return updates, GradNorms(optax.tree.norm(updates), jnp.max(jnp.stack(leaves)))

    return optax.GradientTransformation(init_fn, update_fn)


def grad_norms(opt_state) -> GradNorms:
    """The gradient norms that `record_grad_norms` kept, wherever they are in the
    chained optimizer state."""
    is_norms = lambda x: isinstance(x, GradNorms)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_norms) if is_norms(x))


def loss_with_output_stats(model, state, x, y):
    """The CNN's loss as `sam_step(..., has_aux=True)` takes it: `(loss, (new
    state, (mean, std) of the normalisation layer's output))`."""
    log_probs, state, out = batch_forward(model, state, x)
    return cross_entropy(log_probs, y), (state, (jnp.mean(out), jnp.std(out)))


def training_step(base: optax.GradientTransformation, **sam_step_options):
    """The optimizer (`base` after `record_grad_norms`) and its
    [`eqx_norm.sam_step`][] on `loss_with_output_stats`, with `sam_step_options`
    (micro-batches, perturbation)."""
    optimizer = optax.chain(record_grad_norms(), base)
    step = sam_step(loss_with_output_stats, optimizer, has_aux=True, **sam_step_options)
    return optimizer, step


def _counter_axis(leaf) -> int | None:
    """An optimizer state's integer leaves (its step counts) are the same for every
    member of an ensemble trained in lockstep: kept once, not per member."""
    if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
        return None
    return None if jnp.issubdtype(leaf.dtype, jnp.integer) else 0


def ensemble_step(step):
    """`step(model, state, opt_state, *batch)` over an ensemble (`lockstep`): every
    array per member along axis 0, but the optimizer state's step counts, shared, so
    that a `lax.cond` on them (LookSAM's) stays a branch under `vmap`."""
    per_member = eqx.if_array(0)
    return eqx.filter_vmap(
        step,
        in_axes=(per_member, per_member, _counter_axis, 0, 0),
        out_axes=(per_member, per_member, _counter_axis, per_member, per_member),
    )


def lockstep(ensemble):
    """`(models, states, optimizer states)` stacked along axis 0 (as `filter_vmap`
    makes them), with the optimizer states' step counts kept once."""
    models, states, opt_states = ensemble
    shared = jax.tree.map(
        lambda a: a[0] if _counter_axis(a) is None and eqx.is_array(a) else a,
        opt_states,
    )
    return models, states, shared


def chunk_size(steps: int, most: int = 10) -> int:
    """How many steps one jitted chunk runs: the largest divisor of `steps` up to
    `most`."""
    return max(d for d in range(1, most + 1) if steps % d == 0)


def versions() -> dict[str, str]:
    """The versions of Python, the platform, JAX, Equinox, Optax and eqx_norm, and
    JAX's backend."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("jax", "jaxlib", "equinox", "optax", "eqx_norm"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["backend"] = jax.default_backend()
    return out


def load_splits(
    dataset: str, data_dir: str | Path | None, download: bool = False
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """The train and test splits of `dataset` as JAX arrays; a
    `eqx_norm.experiments.DataNotFoundError` naming `data_dir` if the files are
    not there (unless they are to be downloaded)."""
    check_data_folder(dataset, data_dir, download)
    train = data.load_dataset(
        dataset, "train", folder=data_dir, download_missing=download
    )
    test = data.load_dataset(dataset, "test", folder=data_dir)
    return (
        (jnp.asarray(train[0]), jnp.asarray(train[1])),
        (jnp.asarray(test[0]), jnp.asarray(test[1])),
    )


@eqx.filter_jit
def train_chunk(step, trained, indices, images, labels):
    """`len(indices)` steps of `step` (a `lax.scan`) on `(models, states, optimizer
    states)`, and the metrics of each step. `indices` has shape `(steps, *batch)`."""
    dynamic, static = eqx.partition(trained, eqx.is_array)

    def body(dynamic, idx):
        model, state, opt_state = eqx.combine(dynamic, static)
        model, state, opt_state, loss, (mean, std) = step(
            model, state, opt_state, images[idx], labels[idx]
        )
        norms = grad_norms(opt_state)
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


def accuracy(
    models_and_states, images, labels, chunk: int = 1000, inference: bool = True
) -> np.ndarray:
    """Each model's accuracy on the test set (the models and states stacked along
    axis 0), in chunks of `chunk` images: in inference mode, or in training mode
    (each chunk normalised with its own statistics)."""
    correct = np.zeros(len(jax.tree.leaves(models_and_states)[0]))
    for i in range(0, len(images), chunk):
        correct += np.asarray(
            _count_correct(
                models_and_states,
                images[i : i + chunk],
                labels[i : i + chunk],
                inference,
            )
        )
    return correct / len(images)


RECALIBRATION_BATCHES = 50
"""How many training batches of 64 `recalibrated` reads: the same for every run."""


def recalibration_batches(images: jax.Array, count: int = RECALIBRATION_BATCHES):
    """`count` batches of 64 training images, drawn once with a fixed seed, the same
    for every run and method: what `recalibrated` recomputes the statistics from."""
    rng = np.random.default_rng(12345)
    order = rng.permutation(len(images))[: 64 * count]
    return [images[order[i : i + 64]] for i in range(0, len(order), 64)]


def recalibrated(models_and_states, batches):
    """The states of a stacked ensemble (along axis 0) with every BatchNorm's
    statistics recomputed from `batches` by [`eqx_norm.recalibrate`][], model by
    model; the states as they are for a model without BatchNorm."""
    models, states = models_and_states
    if not batch_norms(models):
        return states
    count = len(jax.tree.leaves(models_and_states)[0])
    pick = lambda tree, i: jax.tree.map(  # noqa: E731
        lambda a: a[i] if eqx.is_array(a) else a, tree
    )
    fixed = [
        recalibrate(pick(models, i), pick(states, i), batches) for i in range(count)
    ]
    return jax.tree.map(lambda *a: jnp.stack(a), *fixed)


@eqx.filter_jit
def _count_correct(models_and_states, images, labels, inference: bool):
    def one(model, state):
        model = eqx.nn.inference_mode(model, inference)
        log_probs, _, _ = batch_forward(model, state, images)
        return jnp.sum(jnp.argmax(log_probs, axis=1) == labels)

    return eqx.filter_vmap(one)(*models_and_states)
