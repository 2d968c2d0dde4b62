"""`sam_step`: the training step of an Equinox model with state, for SAM or any
optimizer."""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import numpy as np
import optax

from .._checks import positive_int
from ._contract import declares_point, pass_point
from ._gradients import DeviceGradient, MeanGradient, MicroBatchGradient
from ._passes import in_micro_batches, whole_batch
from ._step_checks import (
    accumulating,
    check_not_empty,
    check_not_traced_whole,
    check_opt_state,
    check_output,
)

_PERTURBATIONS = ("whole-batch", "per-micro-batch")


def sam_step(
    loss_fn: Callable[..., tuple[Any, Any]],
    optimizer: optax.GradientTransformation | optax.MultiSteps,
    *,
    has_aux: bool = False,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    per_device_perturbation: bool = False,
    micro_batches: int | np.integer = 1,
    perturbation: Literal["whole-batch", "per-micro-batch"] = "whole-batch",
) -> Callable[..., tuple[Any, ...]]:
    """The training step of an Equinox model with state, for SAM or any optimizer.

    The first pass, at the current parameters, gives the loss, the gradient and the
    new state. The optimizer's update is given `grad_fn` as an extra argument (an
    [`eqx_norm.AbstractStepGradient`][]): a SAM-family optimizer such as
    [`eqx_norm.sam`][] or [`eqx_norm.looksam`][] (anywhere inside `optax.chain`,
    `optax.inject_hyperparams`, `optax.apply_if_finite` or `optax.MultiSteps`)
    hands it its perturbation rule through [`eqx_norm.perturbed_gradient`][], and
    the step returns the gradient at the perturbed point: a second pass that sees
    the *same* input state and whose state output is dropped. So BatchNorm running
    statistics are updated once per step, by the unperturbed pass, exactly as a
    plain step would. Any other Optax optimizer ignores `grad_fn`, so the step is
    the ordinary one-pass step, and one training loop serves both. The options
    below say where the gradients come from; the optimizer says how it perturbs;
    neither inspects the other. An optimizer that knows the point of its one
    gradient before the step (one with an [`eqx_norm.NextPerturbation`][] in its
    state, such as Momentum-SAM) gets its single pass taken there, the parameters it
    updates staying unperturbed.

    ```python
    def loss_fn(model, state, x, y):
        batch_model = jax.vmap(
            model, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
        )
        logits, state = batch_model(x, state)
        return cross_entropy(logits, y), state

    step = eqx.filter_jit(eqx_norm.sam_step(loss_fn, eqx_norm.sam(optax.adam(3e-3))))
    model, state, opt_state, loss = step(model, state, opt_state, x, y)
    ```

    Several devices. Under `jax.jit` with the batch sharded over a mesh (see
    [`eqx_norm.shard_batch`][]), gradients are those of the global batch already:
    leave `axis_name` as `None`. Inside `jax.shard_map`, where each device sees its
    shard of the batch, pass the mesh axis as `axis_name`: the loss and gradients are
    averaged across it, and by default the perturbation comes from the averaged
    gradient, so SAM on 8 devices is SAM on the full batch. With
    `per_device_perturbation=True` each device perturbs with its own gradient and
    only the gradients at the perturbed points are averaged (the paper's
    m-sharpness, with m the per-device batch); the optimizer itself is still given
    the averaged gradient.

    Micro-batches. With `micro_batches=m` the batch (every array of `*batch`, along
    its leading axis) is split into `m` equal consecutive micro-batches, processed
    one after another (`lax.scan`), so that the activation memory is that of one
    micro-batch. The first pass threads the state through them (BatchNorm statistics
    are updated once per micro-batch, as in any gradient accumulation) and averages
    their gradients; the perturbation comes from that average, so it is SAM over the
    whole batch; the second pass evaluates each micro-batch at the perturbed point
    from the state that micro-batch saw in the first pass, drops its state output,
    and averages the perturbed gradients. The loss returned is the mean of the
    micro-batch losses, and an aux is that of each micro-batch, stacked on a leading
    axis of size `m`. With a plain optimizer this is plain gradient accumulation.

    With `perturbation="per-micro-batch"` each micro-batch is perturbed by its own
    gradient instead, and only the gradients at the perturbed points are averaged:
    the SAM paper's m-sharpness, with m the micro-batch size, on one device. The
    second pass is still one micro-batch at a time; it keeps the `m` first-pass
    gradients (`m` copies of the parameters' size) to do so. With `axis_name`, each
    device's micro-batches are perturbed by their own gradients. With LookSAM the
    steps that perturb do so per micro-batch. The per-device and per-micro-batch
    options change only where a SAM-family optimizer's perturbation comes from: with
    an optimizer that does not perturb, the step is the plain step.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, state, *batch)` returning `(loss, new_state)`, or
        `(loss, (new_state, aux))` with `has_aux=True`, with a scalar loss.
    - `optimizer`: an Optax optimizer (an `optax.MultiSteps` too), initialised on
        `eqx.filter(model, eqx.is_inexact_array)`.
    - `has_aux`: whether `loss_fn` returns an aux, as in `jax.grad`.
    - `axis_name`: inside `shard_map`, the data-parallel mesh axis (or axes).
    - `per_device_perturbation`: with `axis_name` and SAM, perturb with each
        device's own gradient.
    - `micro_batches`: the number of micro-batches the batch is split into (1: the
        whole batch at once).
    - `perturbation`: `"whole-batch"` (one perturbation from the mean gradient) or
        `"per-micro-batch"` (one per micro-batch, from its own gradient).

    **Returns:**

    `step(model, state, opt_state, *batch)` returning
    `(model, state, opt_state, loss)`, or `(model, state, opt_state, loss, aux)`
    with `has_aux=True`. It can be wrapped in `eqx.filter_jit`, `eqx.filter_vmap`
    (an ensemble of models) or `jax.lax.scan`.

    **Raises:**

    At once, a `ValueError` for a `micro_batches` below 1 (a `TypeError` if it is
    not an int of any integer type), an unknown `perturbation`, or
    `per_device_perturbation` without `axis_name`. When the step is traced, a
    `TypeError` naming `loss_fn` if it returns another structure than `has_aux`
    says, and a `ValueError` naming `opt_state` if it is not a state of `optimizer`
    for this model, if `micro_batches` does not divide the batch or the batch's
    arrays differ in length, or if a per-device or per-micro-batch perturbation is
    asked of an optimizer that calls `grad_fn` at a point of its own instead of
    through `eqx_norm.perturbed_gradient`.
    """
    micro_batches = positive_int("micro_batches", micro_batches, "micro_batches=4")
    if perturbation not in _PERTURBATIONS:
        raise ValueError(
            f"`perturbation` must be one of {_PERTURBATIONS}, got {perturbation!r}; "
            'e.g. `perturbation="per-micro-batch"` for one perturbation per '
            "micro-batch."
        )
    if per_device_perturbation and axis_name is None:
        raise ValueError(
            "`per_device_perturbation=True` needs the data axis: pass `axis_name=` "
            "(the `shard_map` mesh axis the batch is split over)."
        )
    # Where a perturbation takes its gradient from, chosen once.
    source = (
        MicroBatchGradient
        if perturbation == "per-micro-batch"
        else DeviceGradient
        if per_device_perturbation
        else MeanGradient
    )

    def mean(tree):
        return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

    if isinstance(optimizer, optax.MultiSteps):
        # Its `update` passes extra arguments on, but it is not marked as doing so.
        optimizer = optax.GradientTransformationExtraArgs(
            optimizer.init,
            optimizer.update,  # pyright: ignore[reportArgumentType]
        )
    optimizer = optax.with_extra_args_support(optimizer)

    def step(model, state, opt_state, *batch):
        check_not_traced_whole(model)
        params, static = eqx.partition(model, eqx.is_inexact_array)
        check_opt_state(optimizer, opt_state, params)
        check_not_empty(batch)

        def loss_and_rest(params, state, batch):
            out = loss_fn(eqx.combine(params, static), state, *batch)
            check_output(out, has_aux)
            return out

        at = pass_point(opt_state, params)  # `params`, but for one-pass optimizers
        if source.option is not None and declares_point(opt_state):
            raise ValueError(
                f"`sam_step(...)` with `{source.option}` perturbs each part by its "
                "own gradient, but this optimizer declares its one perturbation "
                "before the step (an `eqx_norm.NextPerturbation` in its state, as "
                "`eqx_norm.msam` does), so no part has a perturbation of its own. "
                "Leave the option out: the step's one pass is taken at the declared "
                "point."
            )
        if micro_batches == 1:
            first = whole_batch(loss_and_rest, at, state, batch)
        else:
            first = in_micro_batches(
                loss_and_rest, at, state, batch, micro_batches, has_aux
            )
        updates, opt_state = optimizer.update(
            mean(first.grads),
            opt_state,
            params,
            grad_fn=source(first, loss_and_rest, mean, accumulating(opt_state), params),
        )
        model = eqx.apply_updates(model, updates)
        if has_aux:
            new_state, aux = first.rest
            return model, new_state, opt_state, mean(first.loss), aux
        return model, first.rest, opt_state, mean(first.loss)

    return step
