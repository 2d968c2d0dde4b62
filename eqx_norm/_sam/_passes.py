"""The passes of `sam_step`'s step: the first (unperturbed) one, over the whole
batch or in micro-batches with the state threaded through them, and the passes at
perturbed points, each from the input state its batch saw first."""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._state import copy_state
from ._contract import perturb


class MicroBatches(NamedTuple):
    """What a per-micro-batch perturbation needs from the first pass, each stacked
    on a leading axis: the micro-batches' arrays, the states they saw and their
    gradients; and `join`, which makes one micro-batch's arguments of its arrays."""

    arrays: Any
    seen: Any
    grads: Any
    join: Callable[[Any], tuple]


class FirstPass(NamedTuple):
    """The unperturbed pass: its mean loss, `rest` (the new state, with the aux),
    this device's mean gradient, `gradient_at(p)` (the mean gradient at other
    parameters from the same input states), and, with micro-batches, `parts`."""

    loss: Any
    rest: Any
    grads: Any
    gradient_at: Callable[[Any], Any]
    parts: MicroBatches | None


def split(batch: tuple, m: int) -> tuple[Any, Callable[[Any], tuple]]:
    """Every array of the batch split along its leading axis into `m` equal
    consecutive parts, stacked on a new leading axis; and `join`, which makes one
    micro-batch of those parts and the batch's scalars."""
    sizes = sorted({np.shape(a)[0] for a in jax.tree.leaves(batch) if np.ndim(a)})
    if not sizes:
        got = "no batch" if not jax.tree.leaves(batch) else "only scalars"
        raise ValueError(
            f"`sam_step(micro_batches={m})` splits the batch's arrays along their "
            f"leading axis, but the step got {got}. Pass the batch to the step, "
            "`step(model, state, opt_state, x, y)`, with one row per example, or "
            "use `micro_batches=1`."
        )
    if len(sizes) > 1:
        raise ValueError(
            f"`sam_step(micro_batches={m})` got batch arrays of different leading "
            f"sizes {sizes}; each array of `*batch` must hold one row per example, "
            "so that every micro-batch takes the same examples from each."
        )
    if sizes and sizes[0] % m:
        raise ValueError(
            f"`sam_step(micro_batches={m})` got a batch of {sizes[0]} examples, which "
            f"does not split into {m} equal micro-batches. Use a batch size that "
            "is a multiple of `micro_batches`."
        )
    arrays, others = eqx.partition(batch, lambda a: np.ndim(a) > 0)
    micro = jax.tree.map(
        lambda a: a.reshape((m, a.shape[0] // m) + a.shape[1:]), arrays
    )
    # Scalars (a temperature, a flag) are given whole to every micro-batch.
    return micro, lambda mb: eqx.combine(mb, others)


def whole_batch(loss_and_rest, params, state, batch) -> FirstPass:
    """The first pass on the whole batch; the gradient at other parameters starts
    from the same input state."""
    value_and_grad = jax.value_and_grad(loss_and_rest, has_aux=True)
    (loss, rest), grads = value_and_grad(params, copy_state(state), batch)

    def gradient_at(perturbed):
        loss_at = lambda p: loss_and_rest(p, copy_state(state), batch)[0]  # noqa: E731
        return jax.grad(loss_at)(perturbed)

    return FirstPass(loss, rest, grads, gradient_at, None)


def in_micro_batches(loss_and_rest, params, state, batch, m, has_aux) -> FirstPass:
    """The first pass over `m` micro-batches in turn (`lax.scan`), the state
    threaded through them; the gradient at other parameters evaluates each
    micro-batch from the state it saw here. The aux is each micro-batch's, stacked."""
    micro, join = split(batch, m)
    value_and_grad = jax.value_and_grad(loss_and_rest, has_aux=True)

    def first(carry, mb):
        state, total = carry
        seen = copy_state(state)
        (loss, rest), grads = value_and_grad(params, copy_state(state), join(mb))
        new_state, aux = rest if has_aux else (rest, None)
        return (new_state, optax.tree.add(total, grads)), (loss, aux, seen, grads)

    zero = optax.tree.zeros_like(params)
    try:
        (state, total), (losses, auxes, seen, each) = jax.lax.scan(
            first, (copy_state(state), zero), micro
        )
    except ValueError as error:
        rows = {np.shape(a)[1] for a in jax.tree.leaves(micro)}
        if rows != {1}:
            raise
        # One example per micro-batch: say which setting made the batch that small.
        raise ValueError(
            f"`sam_step(micro_batches={m})` splits each batch into micro-batches "
            f"of one example, and the model refused one example: {error} Use "
            "fewer micro-batches (a batch of at least two examples each), or a "
            "larger batch."
        ) from error

    def gradient_at(perturbed):
        def second(total, mb_and_state):
            mb, mb_state = mb_and_state
            loss_at = lambda p: loss_and_rest(p, mb_state, join(mb))[0]  # noqa: E731
            return optax.tree.add(total, jax.grad(loss_at)(perturbed)), None

        total, _ = jax.lax.scan(second, optax.tree.zeros_like(perturbed), (micro, seen))
        return optax.tree.scale(1 / m, total)

    rest = (state, auxes) if has_aux else state
    grads = optax.tree.scale(1 / m, total)
    parts = MicroBatches(micro, seen, each, join)
    return FirstPass(jnp.mean(losses), rest, grads, gradient_at, parts)


def per_micro_batch(loss_and_rest, rule, params, parts: MicroBatches):
    """The mean over micro-batches of the gradient at each one's own perturbed
    point, `params + rule(its gradient, params)`, one micro-batch at a time."""

    def one(total, part):
        mb, mb_state, grads = part
        loss_at = lambda p: loss_and_rest(p, mb_state, parts.join(mb))[0]  # noqa: E731
        point = perturb(params, rule(grads, params))
        return optax.tree.add(total, jax.grad(loss_at)(point)), None

    stacked = (parts.arrays, parts.seen, parts.grads)
    total, _ = jax.lax.scan(one, optax.tree.zeros_like(params), stacked)
    return optax.tree.scale(1 / len(jax.tree.leaves(parts.grads)[0]), total)
