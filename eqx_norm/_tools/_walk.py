"""Finding and switching the [`eqx_norm.BatchNorm`][] layers of a model."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from .._checks import boolean
from .._nn._approach import AbstractApproach
from .._nn._approaches import as_approach
from .._nn._batch_norm import BatchNorm


def is_batch_norm(x: Any) -> bool:
    return isinstance(x, BatchNorm)


def batch_norms(model: PyTree) -> list[tuple[str, BatchNorm]]:
    """Every [`eqx_norm.BatchNorm`][] in a model, with its path.

    ```python
    for path, bn in eqx_norm.batch_norms(model):
        print(path, bn.input_size, bn.approach)  # .layers[1] 512 Batch()
    ```

    **Arguments:**

    - `model`: any pytree.

    **Returns:**

    A list of `(path, layer)` pairs in pytree order, the path as `jax.tree_util.keystr`
    writes it (e.g. `".layers[1]"`).
    """
    leaves = jtu.tree_leaves_with_path(model, is_leaf=is_batch_norm)
    return [(jtu.keystr(path), leaf) for path, leaf in leaves if is_batch_norm(leaf)]


def no_batch_norm(what: str) -> ValueError:
    """The error of a whole-model tool given a model without `eqx_norm.BatchNorm`."""
    return ValueError(
        f"`{what}` found no `eqx_norm.BatchNorm` in the model. For a model with "
        "`eqx.nn.BatchNorm` layers, convert it first with "
        "`model, state = eqx_norm.from_equinox(model, state)`."
    )


def set_approach(
    model: PyTree,
    approach: str | AbstractApproach,
    *,
    where: Callable[[BatchNorm], bool] | None = None,
) -> PyTree:
    """Switch the approach of every [`eqx_norm.BatchNorm`][] in a model.

    The state stays valid as it is between the built-in approaches that keep the
    same arrays, meaning the same thing (the statistics inference uses): all but
    [`eqx_norm.Tracking`][], which keeps candidate statistics besides. To switch to
    it, follow with `state = eqx_norm.match_state(model, state)`.

    ```python
    model = eqx_norm.set_approach(model, "frozen")
    # Only the layers of 512 channels, to a strategy object:
    model = eqx_norm.set_approach(
        model, eqx_norm.Running(max_count=512), where=lambda bn: bn.input_size == 512
    )
    ```

    **Arguments:**

    - `model`: any pytree holding `eqx_norm.BatchNorm` layers.
    - `approach`: a name or an [`eqx_norm.Approach`][] object.
    - `where`: if given, only layers for which `where(layer)` is true are switched,
        e.g. `where=lambda bn: bn.input_size == 512`.

    **Returns:**

    The model with the approaches switched.

    **Raises:**

    A `ValueError` if no layer matched (rather than returning the model unchanged).
    """
    approach = as_approach(approach)
    return _switch(model, lambda bn: bn.with_approach(approach), where, "set_approach")


def set_compute_channels_last(
    model: PyTree,
    compute_channels_last: bool = True,
    *,
    where: Callable[[BatchNorm], bool] | None = None,
) -> PyTree:
    """Set `compute_channels_last` (see [`eqx_norm.BatchNorm`][]) on every
    [`eqx_norm.BatchNorm`][] in a model, e.g. on those after convolutions, for
    training on the CPU. The state stays valid as it is.

    ```python
    model = eqx_norm.set_compute_channels_last(model)
    ```

    **Arguments:**

    - `model`: any pytree holding `eqx_norm.BatchNorm` layers.
    - `compute_channels_last`: `True` or `False`.
    - `where`: as in [`eqx_norm.set_approach`][].

    **Returns:**

    The model with the setting switched.

    **Raises:**

    A `ValueError` if no layer matched; a `TypeError` for a value that is not a
    bool.
    """
    value = boolean("compute_channels_last", compute_channels_last)
    return _switch(
        model,
        lambda bn: eqx.tree_at(lambda b: b.compute_channels_last, bn, value),
        where,
        "set_compute_channels_last",
    )


def _switch(model, change, where, what: str) -> PyTree:
    """`model` with `change` applied to every BatchNorm that `where` selects, or a
    `ValueError` naming `what` if none is."""
    matched = 0
    if where is not None and not callable(where):
        raise TypeError(_not_a_predicate(what, where))

    def chosen(x) -> bool:
        if where is None:
            return True
        verdict: Any = where(x)
        if not isinstance(verdict, (bool, np.bool_)) and not (
            np.ndim(verdict) == 0
            and getattr(verdict, "dtype", None) is not None
            and np.dtype(verdict.dtype) == np.bool_
            and not isinstance(verdict, jax.core.Tracer)  # pyright: ignore[reportAttributeAccessIssue]
        ):
            raise TypeError(_not_a_predicate(what, verdict, returned=True))
        return bool(verdict)

    def swap(x):
        nonlocal matched
        if is_batch_norm(x) and chosen(x):
            matched += 1
            return change(x)
        return x

    model = jtu.tree_map(swap, model, is_leaf=is_batch_norm)
    if matched == 0:
        if batch_norms(model):
            raise ValueError(f"`{what}`: `where` matched no BatchNorm layer.")
        raise no_batch_norm(what)
    return model


def _not_a_predicate(what: str, value, returned: bool = False) -> str:
    got = f"it returned {value!r}" if returned else f"got {value!r}"
    return (
        f"`{what}`: `where` must be a function of a BatchNorm returning True or "
        f"False, {got}; e.g. `where=lambda bn: bn.input_size == 64`."
    )


def freeze(
    model: PyTree, *, where: Callable[[BatchNorm], bool] | None = None
) -> PyTree:
    """Freeze the statistics of every [`eqx_norm.BatchNorm`][] in a model: training
    then normalises with the stored statistics, never updates them, and works with
    any batch size, 1 included. Weights and biases still learn. The same as
    `set_approach(model, "frozen", where=where)`.

    ```python
    model = eqx_norm.freeze(model)  # then fine-tune, at batch size 1 too
    ```

    **Arguments:**

    - `model`: any pytree holding `eqx_norm.BatchNorm` layers.
    - `where`: as in [`eqx_norm.set_approach`][].

    **Returns:**

    The model with frozen statistics.
    """
    return set_approach(model, "frozen", where=where)


def match_state(model: PyTree, state: eqx.nn.State) -> eqx.nn.State:
    """The state with every [`eqx_norm.BatchNorm`][]'s entry in the form its
    approach keeps, carrying the statistics over.

    Every built-in approach but [`eqx_norm.Tracking`][] keeps the same arrays, so
    [`eqx_norm.set_approach`][] leaves the state valid as it is. `Tracking` keeps
    candidate statistics besides: after switching a model to it, call this to add
    them, each candidate starting from the layer's current statistics. An entry
    already in its approach's form is kept as it is, so the call is safe anywhere.

    ```python
    model = eqx_norm.set_approach(model, "tracking")
    state = eqx_norm.match_state(model, state)
    ```

    **Arguments:**

    - `model`: a model holding `eqx_norm.BatchNorm` layers.
    - `state`: its state.

    **Returns:**

    The new state (the given one is left valid).

    **Raises:**

    A `ValueError` if the model has no `eqx_norm.BatchNorm`.
    """
    layers = batch_norms(model)
    if not layers:
        raise no_batch_norm("match_state")
    changed = {}
    for _, bn in layers:
        entry = state.get(bn.state_index)
        running = bn._running(state)  # checked to be this layer's
        want = bn.approach.init(bn.input_size, running.mean.dtype)
        if eqx.tree_equal(jax.eval_shape(lambda: entry), jax.eval_shape(lambda: want)):
            continue
        changed[bn.state_index.marker] = bn.approach.with_statistics(
            want, running.mean, running.var, running.counter
        )
    state = jax.tree.map(lambda a: a, state)  # a copy: the given state stays valid
    if not changed:
        return state
    indices = {bn.state_index.marker: bn.state_index for _, bn in layers}
    markers = list(changed)
    entries = [state.get(indices[k]) for k in markers]
    return eqx.tree_at(
        lambda s: [s.get(indices[k]) for k in markers],
        state,
        [changed[k] for k in markers],
        is_leaf=lambda x: any(x is e for e in entries),
    )
