from collections.abc import Callable, Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import optax

from ._sam import SAMState


def _uses_sam(opt_state) -> bool:
    is_sam = lambda x: isinstance(x, SAMState)  # noqa: E731
    return any(is_sam(x) for x in jax.tree.leaves(opt_state, is_leaf=is_sam))


def _fresh(state: eqx.nn.State) -> eqx.nn.State:
    # An `eqx.nn.State` may be used only once; each pass gets its own copy (the
    # arrays are shared, nothing is copied at run time).
    return jax.tree.map(lambda x: x, state)


def sam_step(
    loss_fn: Callable[..., tuple[Any, Any]],
    optimizer: optax.GradientTransformation,
    *,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    per_device_perturbation: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """The training step of an Equinox model with state, for SAM or any optimizer.

    With an [`eqx_norm.sam`][] optimizer (anywhere inside `optax.chain` or
    `optax.inject_hyperparams`) the step makes two passes: the first at the current
    parameters gives the loss, the gradient and the new state; the second, at the
    perturbed parameters, sees the *same* input state and its state output is
    dropped. So BatchNorm running statistics are updated once per step, by the
    unperturbed pass, exactly as a plain step would. With any other Optax optimizer
    it is the ordinary one-pass step, so one training loop serves both.

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
    averaged across it, by default before the perturbation, so SAM on 8 devices is
    SAM on the full batch. With `per_device_perturbation=True` each device perturbs
    with its own gradient and only the gradients at the perturbed points are
    averaged (the paper's m-sharpness, with m the per-device batch).

    **Arguments:**

    - `loss_fn`: `loss_fn(model, state, *batch)` returning `(loss, new_state)` or
        `(loss, (new_state, aux))`, with a scalar loss.
    - `optimizer`: an Optax optimizer, initialised on
        `eqx.filter(model, eqx.is_inexact_array)`.
    - `axis_name`: inside `shard_map`, the data-parallel mesh axis (or axes).
    - `per_device_perturbation`: with `axis_name` and SAM, perturb with each
        device's own gradient.

    **Returns:**

    `step(model, state, opt_state, *batch)` returning
    `(model, state, opt_state, loss)`, or `(model, state, opt_state, loss, aux)`
    when `loss_fn` returns an aux. It can be wrapped in `eqx.filter_jit`,
    `eqx.filter_vmap` (an ensemble of models) or `jax.lax.scan`.
    """

    if per_device_perturbation and axis_name is None:
        raise ValueError(
            "`per_device_perturbation=True` needs the data axis: pass `axis_name=` "
            "(the `shard_map` mesh axis the batch is split over)."
        )

    def mean(tree):
        return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

    def step(model, state, opt_state, *batch):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss_and_state(params, state):
            loss, rest = loss_fn(eqx.combine(params, static), state, *batch)
            return loss, rest

        grad_and_value = jax.value_and_grad(loss_and_state, has_aux=True)
        (loss, rest), grads = grad_and_value(params, _fresh(state))
        if _uses_sam(opt_state):

            def grad_fn(perturbed):
                loss_at = lambda p: loss_and_state(p, _fresh(state))[0]  # noqa: E731
                return mean(jax.grad(loss_at)(perturbed))

            updates, opt_state = optimizer.update(
                grads if per_device_perturbation else mean(grads),
                opt_state,
                params,
                grad_fn=grad_fn,  # pyright: ignore[reportCallIssue]
            )
        else:
            updates, opt_state = optimizer.update(mean(grads), opt_state, params)
        loss = mean(loss)
        model = eqx.apply_updates(model, updates)
        if isinstance(rest, eqx.nn.State):
            return model, rest, opt_state, loss
        new_state, aux = rest
        return model, new_state, opt_state, loss, aux

    return step
