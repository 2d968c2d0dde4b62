"""Reading one trained model's test accuracy several ways: with batch statistics,
with the running statistics of several approaches kept side by side in its state,
and recalibrated. What the lag experiment and the SAM comparison share."""

from collections.abc import Callable
from typing import Any, ClassVar, cast

import equinox as eqx
import jax

from .. import (
    AbstractApproach,
    Batch,
    batch_norms,
    match_state,
    recalibrate,
    set_approach,
)

BATCH_STATISTICS = "batch statistics"
RECALIBRATED = "recalibrated"


class SideBySide(AbstractApproach):
    """Trains as the first of its approaches does, and keeps in its state the
    running statistics of every one of them side by side, each updated by the
    approach itself from the same batch statistics: a strategy of the experiments'
    own, on [`eqx_norm.Approach`][]'s public contract. So one training run reads
    every approach that trains as the first does (as `"tracking"` trains as
    `"batch"`).

    **Arguments:**

    - `compared`: `(label, approach, momentum)` for each approach kept; the first
        is the one that trains.
    """

    compared: tuple[tuple[str, AbstractApproach, float], ...] = eqx.field(static=True)
    needs_batch_variance: ClassVar[bool] = True

    def init(self, input_size, dtype):
        base = Batch().init(input_size, dtype)
        kept = {label: a.init(input_size, dtype) for label, a, _ in self.compared}
        return base._replace(extra=kept)

    def train(self, batch, running, momentum, eps):
        (first, approach, m), *others = self.compared
        mean, var, new = approach.train(batch, running.extra[first], m, eps)
        kept = {first: new}
        for label, other, m in others:
            kept[label] = other.train(batch, running.extra[label], m, eps)[2]
        # The first approach's statistics are this layer's own (inference, and
        # the shift the layer takes the batch's second moment about).
        new = running._replace(
            mean=new.mean, var=new.var, counter=new.counter, extra=kept
        )
        return mean, var, new

    def infer(self, running, momentum):
        return running.mean, running.var

    def with_statistics(self, running, mean, var, counter):
        kept = {
            label: a.with_statistics(running.extra[label], mean, var, counter)
            for label, a, _ in self.compared
        }
        return running._replace(mean=mean, var=var, counter=counter, extra=kept)


def readings(
    model,
    state: eqx.nn.State,
    recalibration: list[jax.Array],
    labels: list[str],
    accuracy: Callable[[Any, eqx.nn.State, bool], float],
) -> dict[str, float]:
    """The test accuracy of a model trained with `SideBySide`, read with batch
    statistics (training mode), with each kept approach's running statistics and
    after [`eqx_norm.recalibrate`][] on `recalibration`; `accuracy(model, state,
    inference)` measures one reading."""
    plain = set_approach(model, "batch")
    plain_state = match_state(plain, state)  # the statistics alone, no others kept
    read = {BATCH_STATISTICS: accuracy(plain, plain_state, False)}
    layers = batch_norms(plain)  # the same state indices, approach batch
    for label in labels:
        with_running = jax.tree.map(lambda a: a, plain_state)  # a copy to set
        for _, bn in layers:
            # Every kept approach stores the statistics its inference uses.
            kept = cast(Any, state.get(bn.state_index)).extra[label]
            with_running = bn.set_statistics(
                with_running, kept.mean, kept.var, counter=kept.counter
            )
        read[label] = accuracy(plain, with_running, True)
    fixed = recalibrate(plain, plain_state, recalibration)
    read[RECALIBRATED] = accuracy(plain, fixed, True)
    return read
