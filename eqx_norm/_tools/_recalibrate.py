"""Exact population statistics from data."""

from collections.abc import Iterable
from typing import Any, cast

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .._nn._approaches import Batch
from .._state import copy_state
from ._record import first_input, record_batch_statistics
from ._walk import batch_norms, no_batch_norm


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

    ```python
    batches = [x[i : i + 16] for i in range(0, len(x), 16)]  # or a data loader
    state = eqx_norm.recalibrate(model, state, batches)
    ```

    **Arguments:**

    - `model`: a model holding `eqx_norm.BatchNorm` layers, called per example as
        `model(x, state)` returning the new state among its outputs.
    - `state`: its state.
    - `batches`: an iterable of input batches (arrays of shape `(batch, ...)`, or
        tuples whose first element is the input): a list, a generator or a data
        loader, not one array (`[x[i : i + 256] for i in range(0, len(x), 256)]`
        splits one).
    - `progress`: show a progress bar (needs `tqdm`).

    **Returns:**

    The new state.

    **Raises:**

    A `ValueError` for an empty `batches`, one array given as `batches`, a model
    without `eqx_norm.BatchNorm`, or a batch whose statistics are not finite (the
    input state is left as it was).
    """
    layers = batch_norms(model)
    if not layers:
        raise no_batch_norm("recalibrate")
    if hasattr(batches, "shape") and hasattr(batches, "dtype"):
        shape = tuple(cast(Any, batches).shape)
        raise ValueError(
            f"`recalibrate`: `batches` is one array of shape {shape}, but it must be "
            "an iterable of batches (it would be read as one example per batch). "
            "Split it, e.g. `batches=[x[i : i + 256] for i in range(0, len(x), "
            "256)]` or `batches=jnp.split(x, n)`, or pass a data loader."
        )
    sums: list[tuple[Any, Any]] = [(0.0, 0.0)] * len(layers)
    count = 0
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="recalibrate", unit="batch")
    for k, batch in enumerate(batches):
        recorded = record_batch_statistics(
            model, state, first_input(batch), "recalibrate", Batch()
        )
        for i, stats in enumerate(recorded):
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
    state = copy_state(state)
    for (_, bn), (s1, s2) in zip(layers, sums):
        old = bn._running(state)
        mean = s1 / count
        var = np.maximum(s2 / count - mean**2, 0)
        state = state.set(
            bn.state_index,
            bn.approach.with_statistics(
                old,
                jnp.asarray(mean, old.mean.dtype),
                jnp.asarray(var, old.var.dtype),
                jnp.maximum(old.counter, count).astype(jnp.int32),
            ),
        )
    return state
