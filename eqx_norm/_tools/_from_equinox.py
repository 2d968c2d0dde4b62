"""Converting models built with `eqx.nn.BatchNorm`."""

from typing import Any, cast

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._checks import boolean
from .._nn._approach import AbstractApproach, RunningStats
from .._nn._batch_norm import BatchNorm

_UNKNOWN_LAYOUT = (
    "`from_equinox` met an `eqx.nn.BatchNorm` whose state it does not know (an "
    "Equinox version with another layout); convert with the Equinox version that "
    "eqx_norm is tested with."
)


def from_equinox(
    model: PyTree,
    state: eqx.nn.State,
    approach: str | AbstractApproach | None = None,
    *,
    compute_channels_last: bool = False,
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

    ```python
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(784, 512, key=jax.random.key(0)),
            eqx.nn.BatchNorm(512, axis_name="batch", mode="batch"),
        ]
    )
    model, state = eqx_norm.from_equinox(model, state)  # approach "batch"
    ```

    **Arguments:**

    - `model`: any pytree holding `eqx.nn.BatchNorm` layers.
    - `state`: its `eqx.nn.State`.
    - `approach`: the approach of the new layers; by default `"batch"` for Equinox's
        batch mode and `"ema"` for its ema mode, which keeps training as it was.
    - `compute_channels_last`: the new layers' `compute_channels_last` (see
        [`eqx_norm.BatchNorm`][]): `True` for BatchNorms that follow convolutions,
        when training on the CPU.

    **Returns:**

    A 2-tuple `(model, state)`: the converted model and a new state for it (other
    stateful layers keep their state).

    **Raises:**

    A `ValueError` if the model has no `eqx.nn.BatchNorm`; a `TypeError` for a
    `compute_channels_last` that is not a bool.
    """
    compute_channels_last = boolean("compute_channels_last", compute_channels_last)
    converted = 0

    def convert(x):
        if not isinstance(x, eqx.nn.BatchNorm):
            return x
        stats = equinox_statistics(x, state)
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
            compute_channels_last=compute_channels_last,
        )
        init = cast(RunningStats, new.state_index.init)
        stats = new.approach.with_statistics(
            init,
            stats.mean.astype(init.mean.dtype),
            stats.var.astype(init.var.dtype),
            jnp.asarray(stats.counter, jnp.int32),
        )
        nonlocal converted
        converted += 1
        if x.channelwise_affine:
            new = eqx.tree_at(lambda b: (b.weight, b.bias), new, (x.weight, x.bias))
        return eqx.tree_at(lambda b: b.state_index, new, eqx.nn.StateIndex(stats))

    def carry(x):
        # Every state index of the new model holds its initial value: the carried
        # statistics for a converted layer, the current value for any other.
        if isinstance(x, eqx.nn.BatchNorm):
            return convert(x)
        if isinstance(x, eqx.nn.StateIndex):
            return eqx.nn.StateIndex(state.get(x))
        return x

    model = jtu.tree_map(carry, model, is_leaf=_is_stateful)
    if converted == 0:
        raise ValueError(
            "`from_equinox` found no `eqx.nn.BatchNorm` in the model; there is nothing "
            "to convert."
        )
    return eqx.nn.make_with_state(lambda: model)()


def equinox_statistics(bn: eqx.nn.BatchNorm, state: eqx.nn.State) -> RunningStats:
    """The statistics an `eqx.nn.BatchNorm` uses for inference, and its count; for
    an ema-mode layer that never trained, mean 0 and variance 1 (see
    `equinox_inference_statistics` for what Equinox itself uses there)."""
    if bn.mode == "batch":
        mean, var = equinox_inference_statistics(bn, state)
        assert bn.batch_counter is not None
        return RunningStats(mean, var, state.get(bn.batch_counter))
    if bn.ema_first_time_index is None or bn.ema_state_index is None:
        raise ValueError(_UNKNOWN_LAYOUT)
    first = state.get(bn.ema_first_time_index)
    mean, var = state.get(bn.ema_state_index)
    return RunningStats(
        jnp.where(first, 0, mean),
        jnp.where(first, 1, var),
        jnp.where(first, 0, 1).astype(jnp.int32),
    )


def equinox_inference_statistics(
    bn: eqx.nn.BatchNorm, state: eqx.nn.State
) -> tuple[Array, Array]:
    """`(mean, var)`, exactly as `eqx.nn.BatchNorm.__call__` reads them for
    inference: in batch mode the hidden EMA divided by `1 - momentum**counter` (by 1
    before any step), in ema mode the EMA buffers as they are, which for a layer
    that never trained are its initial zeros."""
    if bn.mode == "batch":
        if bn.batch_counter is None or bn.batch_state_index is None:
            raise ValueError(_UNKNOWN_LAYOUT)
        counter = state.get(bn.batch_counter)
        hidden_mean, hidden_var = state.get(bn.batch_state_index)
        scale = jnp.where(counter == 0, 1, 1 - bn.momentum**counter)
        return hidden_mean / scale, hidden_var / scale
    if bn.ema_state_index is None:
        raise ValueError(_UNKNOWN_LAYOUT)
    mean, var = state.get(bn.ema_state_index)
    return mean, var


def _is_stateful(x: Any) -> bool:
    return isinstance(x, (eqx.nn.BatchNorm, eqx.nn.StateIndex))
