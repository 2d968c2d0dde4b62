from collections.abc import Callable, Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._state import copy_state


def _describe(x: Any) -> str:
    """A short picture of a pytree for an error message: arrays as dtype[shape]."""
    if isinstance(x, eqx.nn.State):
        return "State"
    if isinstance(x, tuple):
        return "(" + ", ".join(_describe(a) for a in x) + ")"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{x.dtype}{list(x.shape)}"
    return type(x).__name__


def _check_output(out: Any, has_aux: bool) -> None:
    """A `TypeError` naming `loss_fn` if its output is not `(loss, state)` (or
    `(loss, (state, aux))` with `has_aux=True`), with a scalar floating loss."""
    expected = "(loss, (state, aux))" if has_aux else "(loss, state)"
    hint = ""
    if isinstance(out, tuple) and len(out) == 2:
        loss, rest = out
        loss_ok = (
            hasattr(loss, "dtype")
            and jnp.ndim(loss) == 0
            and jnp.issubdtype(loss.dtype, jnp.floating)
        )
        pair = isinstance(rest, tuple) and len(rest) == 2
        if has_aux:
            rest_ok = pair and isinstance(rest[0], eqx.nn.State)
        else:
            rest_ok = isinstance(rest, eqx.nn.State)
        if loss_ok and rest_ok:
            return
        if not has_aux and pair and isinstance(rest[0], eqx.nn.State):
            hint = " It returned an aux too: pass `has_aux=True`."
        elif has_aux and isinstance(rest, eqx.nn.State):
            hint = " It returned no aux: leave `has_aux=False`."
        elif pair and isinstance(rest[1], eqx.nn.State):
            hint = " The state comes first: `(loss, (state, aux))`."
        elif not loss_ok:
            hint = " The loss must be a scalar of a floating dtype (e.g. a `.mean()`)."
    raise TypeError(
        f"`loss_fn` must return {expected}, with a scalar loss and the new "
        f"`eqx.nn.State`; it returned {_describe(out)}.{hint}"
    )


def sam_step(
    loss_fn: Callable[..., tuple[Any, Any]],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    per_device_perturbation: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """The training step of an Equinox model with state, for SAM or any optimizer.

    The first pass, at the current parameters, gives the loss, the gradient and the
    new state. The optimizer's update is given `grad_fn`, the gradient at other
    parameters, as an extra argument: an [`eqx_norm.sam`][] optimizer (anywhere
    inside `optax.chain` or `optax.inject_hyperparams`) calls it at the perturbed
    parameters, a second pass that sees the *same* input state and whose state
    output is dropped. So BatchNorm running statistics are updated once per step, by
    the unperturbed pass, exactly as a plain step would. Any other Optax optimizer
    ignores `grad_fn`, so the step is the ordinary one-pass step, and one training
    loop serves both.

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

    - `loss_fn`: `loss_fn(model, state, *batch)` returning `(loss, new_state)`, or
        `(loss, (new_state, aux))` with `has_aux=True`, with a scalar loss.
    - `optimizer`: an Optax optimizer, initialised on
        `eqx.filter(model, eqx.is_inexact_array)`.
    - `has_aux`: whether `loss_fn` returns an aux, as in `jax.grad`.
    - `axis_name`: inside `shard_map`, the data-parallel mesh axis (or axes).
    - `per_device_perturbation`: with `axis_name` and SAM, perturb with each
        device's own gradient.

    **Returns:**

    `step(model, state, opt_state, *batch)` returning
    `(model, state, opt_state, loss)`, or `(model, state, opt_state, loss, aux)`
    with `has_aux=True`. It can be wrapped in `eqx.filter_jit`, `eqx.filter_vmap`
    (an ensemble of models) or `jax.lax.scan`.

    **Raises:**

    When the step is traced, a `TypeError` naming `loss_fn` if it returns another
    structure than `has_aux` says, and a `ValueError` if `per_device_perturbation`
    is given without `axis_name` or with an optimizer that makes no second pass.
    """

    if per_device_perturbation and axis_name is None:
        raise ValueError(
            "`per_device_perturbation=True` needs the data axis: pass `axis_name=` "
            "(the `shard_map` mesh axis the batch is split over)."
        )

    def mean(tree):
        return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

    optimizer = optax.with_extra_args_support(optimizer)

    def step(model, state, opt_state, *batch):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss_and_rest(params, state):
            out = loss_fn(eqx.combine(params, static), state, *batch)
            _check_output(out, has_aux)
            return out

        grad_and_value = jax.value_and_grad(loss_and_rest, has_aux=True)
        (loss, rest), grads = grad_and_value(params, copy_state(state))
        second_passes = []

        def grad_fn(perturbed):
            second_passes.append(perturbed)
            loss_at = lambda p: loss_and_rest(p, copy_state(state))[0]  # noqa: E731
            return mean(jax.grad(loss_at)(perturbed))

        updates, opt_state = optimizer.update(
            grads if per_device_perturbation else mean(grads),
            opt_state,
            params,
            grad_fn=grad_fn,
        )
        if per_device_perturbation and not second_passes:
            raise ValueError(
                "`per_device_perturbation=True` needs an optimizer that perturbs, "
                "such as `eqx_norm.sam(...)`: this one made no second pass, so each "
                "device would apply its own unaveraged gradient."
            )
        model = eqx.apply_updates(model, updates)
        if has_aux:
            new_state, aux = rest
            return model, new_state, opt_state, mean(loss), aux
        return model, rest, opt_state, mean(loss)

    return step
