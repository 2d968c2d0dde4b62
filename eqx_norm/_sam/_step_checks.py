"""What `sam_step`'s step checks before it trains: the model (not traced whole by
`jax.jit`), the optimizer state (the optimizer's, for these parameters), the batch
(not empty), `loss_fn`'s output, and an `optax.MultiSteps` that accumulates."""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

from .._checks import describe


def check_output(out: Any, has_aux: bool) -> None:
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
        f"`eqx.nn.State`; it returned {describe(out)}.{hint}"
    )


MULTI_STEPS = (
    "A SAM-family optimizer inside `optax.MultiSteps` with `every_k_schedule` above "
    "1 would perturb with the gradient accumulated over the mini-batches but take "
    "the gradient at the perturbed point on the last mini-batch only, so the "
    "earlier mini-batches would never reach the update. For SAM over accumulated "
    "batches, give `sam_step` the whole batch and the optimizer without "
    "`MultiSteps`: `eqx_norm.sam_step(loss_fn, eqx_norm.sam(...), "
    "micro_batches=k)` splits it into k micro-batches and evaluates both gradients "
    "on all of them."
)


def accumulating(opt_state) -> Any:
    """Whether an `optax.MultiSteps` in `opt_state` is between two updates (its
    mini-step above 0, which happens only with `every_k_schedule` above 1), as a
    boolean array; `None` where there is no `MultiSteps`. The number of
    mini-batches may be a schedule, so it is known only when the step runs."""
    is_multi = lambda x: isinstance(x, optax.MultiStepsState)  # noqa: E731
    found = [
        x.mini_step > 0
        for x in jax.tree.leaves(opt_state, is_leaf=is_multi)
        if is_multi(x)
    ]
    return None if not found else functools.reduce(jnp.logical_or, found)


def check_not_traced_whole(model) -> None:
    """A `TypeError` pointing to `eqx.filter_jit` if the model's `inference` flags
    are traced: the step was wrapped in `jax.jit`, which traces every leaf of its
    arguments, Python bools included, where `eqx.filter_jit` keeps them static."""
    for path, leaf in jtu.tree_leaves_with_path(model):
        name = getattr(path[-1], "name", None) if path else None
        traced = isinstance(leaf, jax.core.Tracer)  # pyright: ignore[reportAttributeAccessIssue]
        if name == "inference" and traced:
            raise TypeError(
                f"`sam_step`'s step got a model whose `inference` flag (at "
                f"`model{jtu.keystr(path)}`) is a traced array, not a bool: the step "
                "was wrapped in `jax.jit`, which traces every leaf of the model. "
                "Wrap it in `eqx.filter_jit` instead, which keeps non-array leaves "
                "static: `step = eqx.filter_jit(eqx_norm.sam_step(loss_fn, "
                "optimizer))`."
            )


def check_opt_state(optimizer, opt_state, params) -> None:
    """A `ValueError` naming `opt_state` if it is not the state `optimizer.init`
    makes for these parameters (another optimizer's, or other parameters'),
    showing the first place where the two differ."""
    expected = jax.eval_shape(optimizer.init, params)
    difference = _first_difference(expected, opt_state)
    if difference is not None:
        raise ValueError(
            "`opt_state` is not a state of this step's optimizer for this model: "
            f"{difference}. Make it with "
            "`optimizer.init(eqx.filter(model, eqx.is_inexact_array))` (the "
            "parameters only, not the whole model), with the optimizer given to "
            "`sam_step`."
        )


def _first_difference(expected: Any, got: Any) -> str | None:
    """Where two optimizer states first differ in structure, or in a leaf's type or
    shape, as a sentence naming the path; `None` where they agree. `None` leaves
    (what `eqx.filter` leaves of a model's non-parameters) count as leaves, so that
    a state made from the unfiltered model differs at the first such place."""

    def flat(tree):
        is_none = lambda x: x is None  # noqa: E731
        return jtu.tree_flatten_with_path(tree, is_leaf=is_none)[0]

    def picture(x):
        if x is None:
            return "nothing (`None`: not a parameter)"
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return f"an array {x.dtype}{list(x.shape)}"
        return f"a {type(x).__name__}"

    ours, theirs = flat(expected), flat(got)
    whole = (
        f" (the optimizer makes {describe(expected)}, but the step got {describe(got)})"
    )
    for (p, a), (q, b) in zip(ours, theirs):
        if p != q:
            return (
                f"the optimizer's state has {picture(a)} at `opt_state"
                f"{jtu.keystr(p)}` where the step got {picture(b)} at `opt_state"
                f"{jtu.keystr(q)}`{whole}"
            )
        if (a is None) != (b is None) or np.shape(a) != np.shape(b):
            return (
                f"at `opt_state{jtu.keystr(p)}` the optimizer makes {picture(a)}, "
                f"but the step got {picture(b)}"
            )
    if len(ours) != len(theirs):
        longer, n = (
            (ours, "the optimizer's")
            if len(ours) > len(theirs)
            else (
                theirs,
                "the step's",
            )
        )
        path, leaf = longer[min(len(ours), len(theirs))]
        return (
            f"{n} state goes on where the other ends, with {picture(leaf)} at "
            f"`opt_state{jtu.keystr(path)}`{whole}"
        )
    if jax.tree.structure(expected) != jax.tree.structure(got):
        return whole[2:-1]
    return None


def check_not_empty(batch: tuple) -> None:
    """A `ValueError` for a batch with no examples: its mean loss is NaN, and so
    would be every parameter after the update."""
    if any(np.ndim(a) and np.shape(a)[0] == 0 for a in jax.tree.leaves(batch)):
        shapes = [tuple(np.shape(a)) for a in jax.tree.leaves(batch)]
        raise ValueError(
            f"`sam_step`'s step got an empty batch (arrays of shapes {shapes}): its "
            "loss would be NaN and so would every parameter after the update. Skip "
            "empty batches (e.g. a last, partial one) before the step."
        )
