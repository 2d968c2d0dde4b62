from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._looksam import LookSAMState
from ._state import copy_state

_PERTURBATIONS = ("whole-batch", "per-micro-batch")


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
    micro_batches: int = 1,
    perturbation: Literal["whole-batch", "per-micro-batch"] = "whole-batch",
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
    second pass is then one SAM perturbation per micro-batch, still one micro-batch
    at a time; it keeps the `m` first-pass gradients (`m` copies of the parameters'
    size) to do so. It needs an optimizer that makes exactly one second pass per
    update, such as [`eqx_norm.sam`][] (SAM or ASAM, anywhere in a chain);
    [`eqx_norm.looksam`][], which perturbs on some steps only, is refused. With
    `axis_name`, each device's micro-batches are perturbed by their own gradients.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, state, *batch)` returning `(loss, new_state)`, or
        `(loss, (new_state, aux))` with `has_aux=True`, with a scalar loss.
    - `optimizer`: an Optax optimizer, initialised on
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

    When the step is traced, a `TypeError` naming `loss_fn` if it returns another
    structure than `has_aux` says, and a `ValueError` if `per_device_perturbation`
    is given without `axis_name`, if either per-device or per-micro-batch
    perturbation is given an optimizer that makes no second pass (or, for the
    latter, a LookSAM), or if `micro_batches` does not divide the batch.
    """
    if (
        not isinstance(micro_batches, int)
        or isinstance(micro_batches, bool)
        or micro_batches < 1
    ):
        raise ValueError(
            f"`micro_batches` must be a positive int, got {micro_batches!r}; e.g. "
            "`micro_batches=4`."
        )

    if perturbation not in _PERTURBATIONS:
        raise ValueError(
            f"`perturbation` must be one of {_PERTURBATIONS}, got {perturbation!r}; "
            'e.g. `perturbation="per-micro-batch"` for one perturbation per '
            "micro-batch."
        )
    per_micro_batch = perturbation == "per-micro-batch"
    local = per_device_perturbation or per_micro_batch
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

        def loss_and_rest(params, state, batch):
            out = loss_fn(eqx.combine(params, static), state, *batch)
            _check_output(out, has_aux)
            return out

        if micro_batches == 1:
            loss, rest, grads, gradient_at = _whole_batch(
                loss_and_rest, params, state, batch
            )
            parts = None
        else:
            loss, rest, grads, gradient_at, parts = _in_micro_batches(
                loss_and_rest, params, state, batch, micro_batches, has_aux
            )
        if per_micro_batch and _has_looksam(opt_state):
            raise ValueError(
                '`perturbation="per-micro-batch"` needs an optimizer that perturbs '
                "on every step, such as `eqx_norm.sam(...)`; `eqx_norm.looksam` "
                "perturbs on some steps only. Use the whole-batch perturbation "
                "with LookSAM."
            )
        if per_micro_batch and parts is not None:
            perturbed_mean = _perturbed_per_micro_batch(
                loss_and_rest, optimizer, opt_state, params, parts, micro_batches
            )
            gradient_at = lambda _: perturbed_mean  # noqa: E731
        second_passes = []

        def grad_fn(perturbed):
            second_passes.append(perturbed)
            return mean(gradient_at(perturbed))

        updates, opt_state = optimizer.update(
            grads if local else mean(grads),
            opt_state,
            params,
            grad_fn=grad_fn,
        )
        if local and len(second_passes) != 1:
            flag = (
                'perturbation="per-micro-batch"'
                if per_micro_batch
                else "per_device_perturbation=True"
            )
            raise ValueError(
                f"`{flag}` needs an optimizer that perturbs, such as "
                f"`eqx_norm.sam(...)`: this one made {len(second_passes)} second "
                "passes, not one."
            )
        model = eqx.apply_updates(model, updates)
        if has_aux:
            new_state, aux = rest
            return model, new_state, opt_state, mean(loss), aux
        return model, rest, opt_state, mean(loss)

    return step


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _split(batch: tuple, m: int) -> tuple:
    """Every array of the batch split along its leading axis into `m` equal
    consecutive parts, stacked on a new leading axis."""
    sizes = {np.shape(a)[0] for a in jax.tree.leaves(batch) if np.ndim(a) > 0}
    for size in sizes:
        if size % m:
            raise ValueError(
                f"`sam_step(micro_batches={m})` got a batch of {size} examples, which "
                f"does not split into {m} equal micro-batches. Use a batch size that "
                "is a multiple of `micro_batches`."
            )
    return jax.tree.map(
        lambda a: a.reshape((m, a.shape[0] // m) + a.shape[1:]) if np.ndim(a) else a,
        batch,
    )


def _whole_batch(loss_and_rest, params, state, batch):
    """The first pass on the whole batch: `(loss, rest, grads, gradient_at)`, where
    `gradient_at(p)` is the gradient at other parameters from the same input
    state."""
    value_and_grad = jax.value_and_grad(loss_and_rest, has_aux=True)
    (loss, rest), grads = value_and_grad(params, copy_state(state), batch)

    def gradient_at(perturbed):
        loss_at = lambda p: loss_and_rest(p, copy_state(state), batch)[0]  # noqa: E731
        return jax.grad(loss_at)(perturbed)

    return loss, rest, grads, gradient_at


def _in_micro_batches(loss_and_rest, params, state, batch, m, has_aux):
    """As `_whole_batch`, over `m` micro-batches in turn: the mean loss, the final
    state (with each micro-batch's aux, stacked), the mean gradient,
    `gradient_at(p)`, the mean gradient at `p` with each micro-batch evaluated from
    the state it saw in the first pass, and the parts a per-micro-batch
    perturbation needs: the micro-batches, the states they saw and their
    gradients, each stacked on a leading axis of size `m`."""
    micro = _split(batch, m)
    value_and_grad = jax.value_and_grad(loss_and_rest, has_aux=True)

    def first(carry, mb):
        state, total = carry
        seen = copy_state(state)
        (loss, rest), grads = value_and_grad(params, copy_state(state), mb)
        new_state, aux = rest if has_aux else (rest, None)
        return (new_state, _add(total, grads)), (loss, aux, seen, grads)

    zero = jax.tree.map(jnp.zeros_like, params)
    (state, total), (losses, auxes, seen, each) = jax.lax.scan(
        first, (copy_state(state), zero), micro
    )

    def gradient_at(perturbed):
        def second(total, mb_and_state):
            mb, mb_state = mb_and_state
            loss_at = lambda p: loss_and_rest(p, mb_state, mb)[0]  # noqa: E731
            return _add(total, jax.grad(loss_at)(perturbed)), None

        total, _ = jax.lax.scan(
            second, jax.tree.map(jnp.zeros_like, perturbed), (micro, seen)
        )
        return jax.tree.map(lambda g: g / m, total)

    grads = jax.tree.map(lambda g: g / m, total)
    rest = (state, auxes) if has_aux else state
    return jnp.mean(losses), rest, grads, gradient_at, (micro, seen, each)


def _has_looksam(opt_state) -> bool:
    is_looksam = lambda s: isinstance(s, LookSAMState)  # noqa: E731
    return any(map(is_looksam, jax.tree.leaves(opt_state, is_leaf=is_looksam)))


def _perturbed_per_micro_batch(loss_and_rest, optimizer, opt_state, params, parts, m):
    """The mean over micro-batches of the gradient at each one's own perturbed
    point: the optimizer's update is run once per micro-batch on its gradient (in a
    `lax.scan`, one micro-batch at a time), only to catch the point its `grad_fn`
    is called at; its updates are dropped, and XLA removes what only they use."""
    micro, seen, each = parts

    def one(total, part):
        mb, mb_state, grads = part
        found = []

        def grad_fn(perturbed):
            loss_at = lambda p: loss_and_rest(p, mb_state, mb)[0]  # noqa: E731
            found.append(jax.grad(loss_at)(perturbed))
            return found[-1]

        optimizer.update(grads, opt_state, params, grad_fn=grad_fn)
        if len(found) != 1:
            raise ValueError(
                '`perturbation="per-micro-batch"` needs an optimizer that perturbs, '
                f"such as `eqx_norm.sam(...)`: this one made {len(found)} second "
                "passes, not one."
            )
        return _add(total, found[0]), None

    zero = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(one, zero, (micro, seen, each))
    return jax.tree.map(lambda g: g / m, total)
