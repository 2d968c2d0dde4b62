r"""The contract between a SAM-family optimizer and the training step.

The optimizer says *how* it perturbs: a rule from a gradient (and the parameters)
to a perturbation, handed to [`eqx_norm.perturbed_gradient`][] when, and only when,
it wants the gradient at the perturbed point. The step says *where the gradients
come from*: whose gradient feeds the rule (the batch's mean, each device's own or
each micro-batch's own) and how the gradients at the perturbed points are averaged.
Neither watches the other run. An optimizer that knows before the step where its
one gradient should be taken says so in its state ([`eqx_norm.NextPerturbation`][]),
and the step takes its only pass there.
"""

import abc
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

Perturbation: TypeAlias = Callable[[optax.Updates, optax.Params], optax.Updates]
"""A perturbation rule: `rule(grads, params)` returns the perturbation $e$, with the
structure of the parameters; the perturbed point is `params + e`."""


class AbstractStepGradient(abc.ABC):
    """What [`eqx_norm.sam_step`][] passes an optimizer as `grad_fn`.

    Called with parameters, it is the plain `grad_fn`: the gradient of the step's
    batch at those parameters, from the step's input state. Through
    [`eqx_norm.perturbed_gradient`][] it also takes a perturbation rule and decides
    whose gradient feeds it: the batch's mean gradient (the default), each device's
    own (`per_device_perturbation=True`) or each micro-batch's own
    (`perturbation="per-micro-batch"`).
    """

    @abc.abstractmethod
    def __call__(self, params: optax.Params) -> optax.Updates:
        """The gradient at `params`, averaged over the batch (and devices)."""

    @abc.abstractmethod
    def perturbed(
        self, rule: Perturbation, grads: optax.Updates, params: optax.Params
    ) -> optax.Updates:
        """The average gradient at the perturbed points that `rule` gives: from
        `grads` (the gradient the optimizer was given) or from each part's own."""


class NextPerturbation(NamedTuple):
    """Declares, inside an optimizer's state, the point of the next step's one pass.

    An optimizer that knows before a step where its gradient should be taken (as
    Momentum-SAM does, from its momentum) keeps a `NextPerturbation` in its state.
    [`eqx_norm.sam_step`][] then makes the step's single forward and backward pass at
    `params + perturbation` (BatchNorm statistics come from that pass) and gives the
    optimizer the gradient there, while the parameters it updates and returns stay
    unperturbed. Found anywhere in the state, so it works inside `optax.chain`,
    `optax.inject_hyperparams` and the like. See [`eqx_norm.pass_point`][].

    **Attributes:**

    - `perturbation`: with the structure of the parameters; zeros for "at the
        parameters themselves".
    """

    perturbation: optax.Updates


def _is_next(x: Any) -> bool:
    return isinstance(x, NextPerturbation)


def declares_point(opt_state: optax.OptState) -> bool:
    """Whether an optimizer state declares the point of the next step's pass (holds
    an [`eqx_norm.NextPerturbation`][])."""
    return any(map(_is_next, jax.tree.leaves(opt_state, is_leaf=_is_next)))


def pass_point(opt_state: optax.OptState, params: optax.Params) -> optax.Params:
    """Where the next step's gradient is taken: `params` plus every
    [`eqx_norm.NextPerturbation`][] in `opt_state` (just `params` where there is
    none). [`eqx_norm.sam_step`][] calls it; a training loop written by hand calls
    it to know where to evaluate the gradient it passes to `update`.

    **Arguments:**

    - `opt_state`: the optimizer's state.
    - `params`: the current parameters.

    **Returns:**

    The parameters at which to take the step's one pass.
    """
    found = [
        x.perturbation
        for x in jax.tree.leaves(opt_state, is_leaf=_is_next)
        if _is_next(x)
    ]
    for perturbation in found:
        ours = jax.tree.structure(params)
        theirs = jax.tree.structure(perturbation, is_leaf=_is_masked)
        if ours != theirs:
            raise ValueError(
                "`pass_point`: the `eqx_norm.NextPerturbation` in the optimizer "
                "state does not have the structure of the parameters, `params`: "
                "they are "
                f"{ours}, the perturbation is {theirs}. Pass the parameters the "
                "optimizer state was made for, `eqx.filter(model, "
                "eqx.is_inexact_array)`; an optimizer that declares a perturbation "
                "must give it the structure of the parameters."
            )
        params = perturb(params, perturbation, _DECLARED)
    return params


def _is_masked(x: Any) -> bool:
    """An `optax.MaskedNode`: where `optax.masked` leaves a parameter out (it is
    then not perturbed)."""
    return isinstance(x, optax.MaskedNode)


_RULE = "the perturbation rule's `e = rule(grads, params)`"
_DECLARED = "the `eqx_norm.NextPerturbation` in the optimizer state"


def perturb(
    params: optax.Params, perturbation: optax.Updates, source: str = _RULE
) -> optax.Params:
    """`params + perturbation`, leaf by leaf, in the parameters' dtypes; a
    `ValueError` naming `source` where the perturbation has another structure than
    the parameters or a leaf that would broadcast a parameter to another shape (a
    gradient of that shape would then reshape the model)."""

    def add(e: Any, w: Any) -> Any:
        if _is_masked(e):  # left out by `optax.masked`: not perturbed
            return w
        kind = getattr(e, "dtype", None) if hasattr(e, "dtype") else None
        if isinstance(e, (str, bytes)) or (
            kind is not None and not jnp.issubdtype(kind, jnp.number)
        ):
            raise TypeError(
                f"{source} has a leaf {e!r} that is not an array of numbers; it "
                "must hold one array of numbers for each parameter, e.g. "
                "`jax.tree.map(lambda g: rho * g, grads)`."
            )
        try:
            shape = np.broadcast_shapes(np.shape(w), np.shape(e))
        except ValueError:
            shape = None
        if shape != np.shape(w):
            raise ValueError(
                f"{source} has a leaf of shape {tuple(np.shape(e))} for a parameter "
                f"of shape {tuple(np.shape(w))}; it must have the structure and "
                "shapes of the parameters (e.g. `jax.tree.map(lambda g: rho * g, "
                "grads)`)."
            )
        return w + jnp.asarray(e).astype(w.dtype)

    ours = jax.tree.structure(params, is_leaf=_is_masked)
    theirs = jax.tree.structure(perturbation, is_leaf=_is_masked)
    if ours != theirs:
        raise ValueError(
            f"{source} does not have the structure of the parameters: the "
            f"parameters are {ours}, it is {theirs}. Return one array for each "
            "parameter, e.g. `jax.tree.map(lambda g: rho * g, grads)`."
        )
    return jax.tree.map(add, perturbation, params, is_leaf=_is_masked)


def perturbed_gradient(
    grad_fn: Callable[[optax.Params], optax.Updates] | None,
    rule: Perturbation,
    grads: optax.Updates,
    params: optax.Params | None,
) -> optax.Updates:
    r"""The gradient at the point a SAM-family optimizer perturbs to: the one call a
    SAM variant makes to get its second gradient.

    With a plain `grad_fn` (an `update` called by hand), this is
    `grad_fn(params + rule(grads, params))`. With the `grad_fn` that
    [`eqx_norm.sam_step`][] passes (an [`eqx_norm.AbstractStepGradient`][]), the step
    applies `rule` to the gradient its options name: `grads` by default, each
    device's own gradient with `per_device_perturbation=True`, or each micro-batch's
    own with `perturbation="per-micro-batch"`, and averages the gradients at the
    perturbed points. So a variant written on this call gets every option of the
    step, and the step never needs to know what the variant does.

    ```python
    def signed_sam(base, rho):  # a SAM variant in a dozen lines
        base = optax.with_extra_args_support(base)

        def rule(grads, params):
            return jax.tree.map(lambda g: rho * jnp.sign(g), grads)

        def update_fn(updates, state, params=None, *, grad_fn=None, **extra):
            g = eqx_norm.perturbed_gradient(grad_fn, rule, updates, params)
            return base.update(g, state, params, **extra)

        return optax.GradientTransformationExtraArgs(base.init, update_fn)
    ```

    Call it once per step where the variant perturbs (inside a `lax.cond` if it
    perturbs on some steps only, as [`eqx_norm.looksam`][] does): each call is one
    more forward and backward pass.

    **Arguments:**

    - `grad_fn`: the `grad_fn` the optimizer's `update` was given.
    - `rule`: the perturbation rule, `rule(grads, params) -> e`, with `e` of the
        structure of `params`.
    - `grads`: the gradient the optimizer was given.
    - `params`: the current parameters.

    **Returns:**

    The gradient at the perturbed point (or the mean over the perturbed points).

    **Raises:**

    A `ValueError` if `grad_fn` or `params` is `None` (an `update` called without
    them), saying how to pass them.
    """
    checked_fn, checked_params = check_update_args(None, grad_fn, params)
    if not callable(rule):
        raise TypeError(
            "`perturbed_gradient`: `rule` must be a function `rule(grads, params) "
            f"-> e`, the perturbation, got {rule!r}; e.g. `lambda g, p: "
            "jax.tree.map(lambda x: rho * x, g)`."
        )
    return gradient_at_perturbed(checked_fn, rule, grads, checked_params)


def gradient_at_perturbed(
    grad_fn: Callable[[optax.Params], optax.Updates],
    rule: Perturbation,
    grads: optax.Updates,
    params: optax.Params,
) -> optax.Updates:
    """[`eqx_norm.perturbed_gradient`][] for arguments already checked (by the
    built-in optimizers' `update`, with their own name in the message)."""
    if isinstance(grad_fn, AbstractStepGradient):
        return grad_fn.perturbed(rule, grads, params)
    return grad_fn(perturb(params, rule(grads, params)))


def check_update_args(name: str | None, grad_fn: Any, params: Any) -> tuple[Any, Any]:
    """`(grad_fn, params)`, or a `ValueError` saying which is missing and how to
    pass it; `name` is the optimizer's (`None`: a user's)."""
    who = (
        "this optimizer's `update`"
        if name is None
        else f"`eqx_norm.{name}(...).update`"
    )
    if grad_fn is None:
        raise ValueError(
            f"{who} needs `grad_fn=`: a function from "
            "perturbed parameters to the gradient there. Call "
            "`opt.update(grads, opt_state, params, grad_fn=grad_fn)`, or let "
            "`eqx_norm.sam_step(loss_fn, opt)` build the whole step."
        )
    if not callable(grad_fn):
        raise TypeError(
            f"{who}: `grad_fn` must be a function from perturbed parameters to the "
            f"gradient there, got a {type(grad_fn).__name__}; e.g. `grad_fn="
            "jax.grad(loss)`, or let `eqx_norm.sam_step(loss_fn, opt)` build the "
            "whole step."
        )
    if params is None:
        raise ValueError(
            f"{who} needs `params`, the current parameters: "
            "`opt.update(grads, opt_state, params, grad_fn=grad_fn)`."
        )
    return grad_fn, params


def sam_rule(rho: Any, adaptive: Any, eta: Any, mask: Any) -> Perturbation:
    r"""(A)SAM's rule: $e = \rho T^2 g / \lVert T g \rVert$ over the masked leaves,
    0 elsewhere and where $g = 0$; $T = 1$ (SAM) or $|w| + \eta$ (ASAM)."""

    def rule(grads: optax.Updates, params: optax.Params) -> optax.Updates:
        chosen = mask(params) if _is_mask_function(mask) else mask
        if chosen is not None:
            _check_mask(chosen, params)
            grads = jax.tree.map(
                lambda m, sub: jax.tree.map(
                    lambda g: jnp.where(m, g, jnp.zeros_like(g)), sub
                ),
                chosen,
                grads,
            )

        def t_of(w):
            t = jnp.abs(w) + jnp.asarray(eta, w.dtype)
            if isinstance(adaptive, bool):
                return t if adaptive else jnp.ones_like(w)
            return jnp.where(adaptive, t, jnp.ones_like(w))

        t = jax.tree.map(t_of, params)
        tg = jax.tree.map(lambda t, g: (t * g).astype(jnp.float32), t, grads)
        norm = optax.tree.norm(tg)
        radius = jnp.asarray(rho, jnp.float32)  # a bfloat16 `rho` too, under strict
        scale = jnp.where(norm > 0, radius / jnp.where(norm > 0, norm, 1), 0)
        return jax.tree.map(lambda t, tg: scale * t.astype(jnp.float32) * tg, t, tg)

    return rule


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_)) or (
        hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.bool_)
    )


def _check_mask(mask: Any, params: Any) -> None:
    """A `TypeError` or `ValueError` naming `mask` unless it is a tree of bools with
    the structure of the parameters, or a prefix of it."""
    bad = [x for x in jax.tree.leaves(mask) if not _is_bool(x)]
    if bad:
        raise TypeError(
            "`mask` must be a pytree of bools (True where a parameter is "
            f"perturbed), or a function of the parameters returning one; it holds "
            f"{bad[0]!r}. For example `mask=eqx_norm.normalisation_mask`, or "
            "`jax.tree.map(lambda _: True, params)` edited with `eqx.tree_at`."
        )
    try:
        jax.tree.map(lambda m, sub: None, mask, params, is_leaf=_is_masked)
    except ValueError:
        raise ValueError(
            "`mask` does not have the structure of the parameters (or a prefix of "
            f"it): the parameters are {jax.tree.structure(params)}, the mask is "
            f"{jax.tree.structure(mask)}. Make it from the parameters the "
            "optimizer updates, e.g. `eqx_norm.normalisation_mask(eqx.filter("
            "model, eqx.is_inexact_array))`, or pass a function of them."
        ) from None


def _is_mask_function(mask: Any) -> bool:
    """Whether `mask` is a function of the parameters rather than a tree of bools.
    An Equinox module is callable, so a mask made from a filtered model (an
    `eqx.nn.Sequential` of bools, say) would otherwise be called on the
    parameters: a tree whose leaves are all bools is a tree."""
    if isinstance(mask, eqx.Module):  # a tree, however callable
        return False
    leaves = jax.tree.leaves(mask)
    return callable(mask) and not (leaves and all(map(_is_bool, leaves)))
