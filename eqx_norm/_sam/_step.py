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
    new state. The optimizer's update is also given `grad_fn` (an
    [`eqx_norm.AbstractStepGradient`][]); a SAM-family optimizer, anywhere inside
    `optax.chain`, `optax.inject_hyperparams`, `optax.apply_if_finite` or
    `optax.MultiSteps`, hands it its perturbation rule through
    [`eqx_norm.perturbed_gradient`][] and gets the gradient at the perturbed point:
    a second pass from the *same* input state, whose state output is dropped, so
    that running statistics are updated once per step. Any other optimizer ignores
    `grad_fn` and the step is the plain one. An optimizer with an
    [`eqx_norm.NextPerturbation`][] in its state (Momentum-SAM) gets its one pass
    taken at the point it declares. The guide, with examples for several devices
    and micro-batches, is [SAM and ASAM](../sam.md).

    With `per_device_perturbation=True` or `perturbation="per-micro-batch"` the
    perturbation comes from each part's own gradient, which no transformation has
    seen: a transformation chained *before* the SAM-family optimizer (say
    `optax.chain(optax.clip_by_global_norm(1.0), eqx_norm.sam(base))`) then shapes
    only the mean gradient it is given, not the perturbations. In every mode the
    gradient at the perturbed points reaches the base optimizer unchanged by such
    transformations: put them inside `base` to apply them to the update.

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
