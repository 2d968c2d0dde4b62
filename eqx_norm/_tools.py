from collections.abc import Callable, Iterable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._approaches import Approach, Batch, BatchStats, RunningStats, as_approach
from ._batch_norm import BatchNorm


def _is_bn(x: Any) -> bool:
    return isinstance(x, BatchNorm)


def batch_norms(model: PyTree) -> list[tuple[str, BatchNorm]]:
    """Every [`eqx_norm.BatchNorm`][] in a model, with its path.

    **Arguments:**

    - `model`: any pytree.

    **Returns:**

    A list of `(path, layer)` pairs in pytree order, the path as `jax.tree_util.keystr`
    writes it (e.g. `".layers[1]"`).
    """
    leaves = jtu.tree_leaves_with_path(model, is_leaf=_is_bn)
    return [(jtu.keystr(path), leaf) for path, leaf in leaves if _is_bn(leaf)]


def _no_batch_norm(what: str) -> ValueError:
    return ValueError(
        f"`{what}` found no `eqx_norm.BatchNorm` in the model. For a model with "
        "`eqx.nn.BatchNorm` layers, convert it first with "
        "`model, state = eqx_norm.from_equinox(model, state)`."
    )


def set_approach(
    model: PyTree,
    approach: str | Approach,
    *,
    where: Callable[[BatchNorm], bool] | None = None,
) -> PyTree:
    """Switch the approach of every [`eqx_norm.BatchNorm`][] in a model.

    The state stays valid as it is: every built-in approach keeps the same arrays,
    meaning the same thing (the statistics inference uses).

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
    matched = 0

    def swap(x):
        nonlocal matched
        if _is_bn(x) and (where is None or where(x)):
            matched += 1
            return x.with_approach(approach)
        return x

    model = jtu.tree_map(swap, model, is_leaf=_is_bn)
    if matched == 0:
        if batch_norms(model):
            raise ValueError("`set_approach`: `where` matched no BatchNorm layer.")
        raise _no_batch_norm("set_approach")
    return model


def freeze(
    model: PyTree, *, where: Callable[[BatchNorm], bool] | None = None
) -> PyTree:
    """Freeze the statistics of every [`eqx_norm.BatchNorm`][] in a model: training
    then normalises with the stored statistics, never updates them, and works with
    any batch size, 1 included. Weights and biases still learn. The same as
    `set_approach(model, "frozen", where=where)`.

    **Arguments:**

    - `model`: any pytree holding `eqx_norm.BatchNorm` layers.
    - `where`: as in [`eqx_norm.set_approach`][].

    **Returns:**

    The model with frozen statistics.
    """
    return set_approach(model, "frozen", where=where)


def _restate(model: PyTree, value_of: Callable[[eqx.nn.StateIndex], Any]):
    """A model and a fresh state, each state index initialised by `value_of`."""

    def fresh(x):
        if isinstance(x, eqx.nn.StateIndex):
            return eqx.nn.StateIndex(value_of(x))
        return x

    model = jtu.tree_map(
        fresh, model, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)
    )
    return eqx.nn.make_with_state(lambda: model)()


_NEW = "eqx_norm.from_equinox:"


def from_equinox(
    model: PyTree, state: eqx.nn.State, approach: str | Approach | None = None
) -> tuple[PyTree, eqx.nn.State]:
    """Replace every `eqx.nn.BatchNorm` in a model with an [`eqx_norm.BatchNorm`][],
    carrying weights, biases, hyperparameters and running statistics over, so that
    inference outputs are unchanged.

    With `mode="batch"`, Equinox keeps a hidden EMA whose variance starts at 1 and
    divides it by $1 - m^t$ for inference; the carried statistics are exactly what it
    used for inference, start-up bias included, and the counter carries over, so
    that further training weights that bias away as Equinox would have. With
    `mode="ema"` the EMA carries over as it is (or mean 0 and variance 1 for a layer
    that never trained).

    **Arguments:**

    - `model`: any pytree holding `eqx.nn.BatchNorm` layers.
    - `state`: its `eqx.nn.State`.
    - `approach`: the approach of the new layers; by default `"batch"` for Equinox's
        batch mode and `"ema"` for its ema mode, which keeps training as it was.

    **Returns:**

    A 2-tuple `(model, state)`: the converted model and a new state for it (other
    stateful layers keep their state).

    **Raises:**

    A `ValueError` if the model has no `eqx.nn.BatchNorm`.
    """
    converted = 0

    def convert(x):
        if not isinstance(x, eqx.nn.BatchNorm):
            return x
        if x.mode == "batch":
            assert x.batch_counter is not None and x.batch_state_index is not None
            counter = state.get(x.batch_counter)
            hidden_mean, hidden_var = state.get(x.batch_state_index)
            scale = jnp.where(counter == 0, 1, 1 - x.momentum**counter)
            stats = RunningStats(hidden_mean / scale, hidden_var / scale, counter)
        else:
            assert x.ema_first_time_index is not None and x.ema_state_index is not None
            first = state.get(x.ema_first_time_index)
            mean, var = state.get(x.ema_state_index)
            stats = RunningStats(
                jnp.where(first, 0, mean),
                jnp.where(first, 1, var),
                jnp.where(first, 0, 1).astype(jnp.int32),
            )
        dtype = x.weight.dtype if x.weight is not None else stats.mean.dtype
        new = BatchNorm(
            x.input_size,
            x.axis_name,
            approach=approach if approach is not None else x.mode,
            momentum=x.momentum,
            eps=x.eps,
            channelwise_affine=x.channelwise_affine,
            inference=x.inference,
            dtype=dtype,
        )
        stats = RunningStats(
            stats.mean.astype(new.state_index.init.mean.dtype),  # pyright: ignore
            stats.var.astype(new.state_index.init.var.dtype),  # pyright: ignore
            jnp.asarray(stats.counter, jnp.int32),
        )
        nonlocal converted
        converted += 1
        # Mark the new index (its static marker survives `tree_at`), so that its
        # value is taken from `init` rather than looked up in the old state.
        index = eqx.nn.StateIndex(stats)
        object.__setattr__(index, "marker", f"{_NEW}{converted}")
        if x.channelwise_affine:
            new = eqx.tree_at(lambda b: (b.weight, b.bias), new, (x.weight, x.bias))
        return eqx.tree_at(lambda b: b.state_index, new, index)

    is_eqx_bn = lambda x: isinstance(x, eqx.nn.BatchNorm)  # noqa: E731
    model = jtu.tree_map(convert, model, is_leaf=is_eqx_bn)
    if converted == 0:
        raise ValueError(
            "`from_equinox` found no `eqx.nn.BatchNorm` in the model; there is nothing "
            "to convert."
        )
    return _restate(
        model,
        lambda index: (
            index.init if str(index.marker).startswith(_NEW) else state.get(index)
        ),
    )


class _Record(Approach):
    """Normalises as `inner` does, but stores this batch's statistics in the state
    (mean, biased variance, and the counter advanced by the number of values per
    channel), for the tools to read."""

    inner: Approach = eqx.field(static=True)

    @property
    def needs_batch_variance(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.needs_batch_variance

    def train(self, batch, running, momentum, eps):
        mean, var, _ = self.inner.train(batch, running, momentum, eps)
        return mean, var, RunningStats(batch.mean, batch.var, running.counter + batch.n)


def _record_batch_statistics(
    model: PyTree, state: eqx.nn.State, x: Any, inner: Approach | None
) -> list[tuple[BatchStats | None, BatchNorm]]:
    """One training-mode forward pass that reports every layer's batch statistics
    (None where they were not finite). `inner=None` keeps each layer's approach."""
    layers = batch_norms(model)
    recording = jtu.tree_map(
        lambda b: b.with_approach(_Record(inner or b.approach)) if _is_bn(b) else b,
        model,
        is_leaf=_is_bn,
    )
    recording = eqx.nn.inference_mode(recording, False)
    axis_names = {bn.axis_name for _, bn in layers}
    if len(axis_names) != 1:
        raise ValueError(
            f"The model's BatchNorm layers use several axis names {axis_names}; pass "
            "`forward=` to say how to call the model on a batch."
        )
    new_state = _forward(
        recording, jax.tree.map(lambda a: a, state), x, axis_names.pop()
    )
    out = []
    for _, bn in layers:
        after = new_state.get(bn.state_index)
        # Where the batch was not finite, the layer kept its state: no count moved.
        n = int(after.counter) - int(state.get(bn.state_index).counter)
        out.append((BatchStats(after.mean, after.var, n) if n > 0 else None, bn))
    return out


@eqx.filter_jit
def _forward(model, state, x, axis_name):
    def call(xi, s):
        out = model(xi, s)
        return next(o for o in out if isinstance(o, eqx.nn.State))

    return jax.vmap(call, in_axes=(0, None), out_axes=None, axis_name=axis_name)(
        x, state
    )


def _first(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def recalibrate(
    model: PyTree,
    state: eqx.nn.State,
    batches: Iterable[Any],
    *,
    progress: bool = False,
) -> eqx.nn.State:
    r"""Recompute the running statistics of every [`eqx_norm.BatchNorm`][] exactly,
    from data: for bad statistics (a corrupted running variance, a model trained
    with `ema`) or after weight averaging (SWA, EMA of weights).

    Each batch is passed through the model in training mode with every layer
    normalising with its batch statistics (as PyTorch's `swa_utils.update_bn` and
    detectron2's PreciseBN do), one jitted pass per batch. Each layer then gets the
    population statistics of its inputs, weighting every batch equally:

    $$\mu = \frac{1}{K}\sum_k \mu_k, \qquad
    \sigma^2 = \frac{1}{K}\sum_k \left(v_k + (\mu_k - \mu)^2\right)$$

    (over equal-sized batches, the mean and biased variance of all values seen),
    accumulated in float64. The counter becomes at least $K$, so further training
    weighs these statistics like $K$ steps. The approaches and weights are unchanged.

    **Arguments:**

    - `model`: a model holding `eqx_norm.BatchNorm` layers, called per example as
        `model(x, state)` returning the new state among its outputs.
    - `state`: its state.
    - `batches`: an iterable of input batches (arrays of shape `(batch, ...)`, or
        tuples whose first element is the input).
    - `progress`: show a progress bar (needs `tqdm`).

    **Returns:**

    The new state.

    **Raises:**

    A `ValueError` for an empty `batches`, a model without `eqx_norm.BatchNorm`, or
    a batch whose statistics are not finite (the input state is left as it was).
    """
    layers = batch_norms(model)
    if not layers:
        raise _no_batch_norm("recalibrate")
    sums: list[tuple[Any, Any]] = [(0.0, 0.0)] * len(layers)
    count = 0
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="recalibrate", unit="batch")
    for k, batch in enumerate(batches):
        recorded = _record_batch_statistics(model, state, _first(batch), Batch())
        for i, (stats, bn) in enumerate(recorded):
            if stats is None:
                raise ValueError(
                    f"`recalibrate`: batch {k} gave non-finite statistics at the "
                    f"BatchNorm layer at {layers[i][0]!r}; the state was not changed."
                )
            mu = np.asarray(stats.mean, np.float64)
            sums[i] = (
                sums[i][0] + mu,
                sums[i][1] + np.asarray(stats.var, np.float64) + mu**2,
            )
        count += 1
    if count == 0:
        raise ValueError("`recalibrate` got no batches; pass at least one.")
    # A copy: setting values on the caller's state would invalidate it.
    state = jax.tree.map(lambda a: a, state)
    for (_, bn), (s1, s2) in zip(layers, sums):
        old = state.get(bn.state_index)
        mean = s1 / count
        var = np.maximum(s2 / count - mean**2, 0)
        state = state.set(
            bn.state_index,
            RunningStats(
                jnp.asarray(mean, old.mean.dtype),
                jnp.asarray(var, old.var.dtype),
                jnp.maximum(old.counter, count).astype(jnp.int32),
            ),
        )
    return state
