"""The contract of a statistics strategy ("approach") of [`eqx_norm.BatchNorm`][]:
the statistics it exchanges with the layer and the abstract classes it implements.
"""

import abc
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import equinox as eqx
import jax.numpy as jnp
from equinox import AbstractClassVar
from jaxtyping import Array, Float, Int


class BatchStats(NamedTuple):
    """The statistics of one training batch, per channel.

    **Attributes:**

    - `mean`: the batch mean, shape `(input_size,)`, float32 or wider.
    - `var`: the biased (population) batch variance, same shape and dtype.
    - `n`: the number of values per channel that the statistics were taken over
        (batch size times the spatial size): a static Python `int`, or an int32
        scalar array when a `mask` selects the values (then known only at run
        time). With ghost batches, the number in one group.
    """

    mean: Float[Array, " channels"]
    var: Float[Array, " channels"]
    n: int | Int[Array, ""]


class RunningStats(NamedTuple):
    """The running statistics of one layer, as kept in `eqx.nn.State`.

    **Attributes:**

    - `mean`: the per-channel mean that inference uses, shape `(input_size,)`.
    - `var`: the per-channel variance that inference uses, same shape.
    - `counter`: an int32 scalar: how many training steps have updated the statistics
        (for the `running` approach: how many values, capped at `max_count`).
    - `extra`: what else an approach keeps, or `None` (every built-in approach but
        [`eqx_norm.Tracking`][], whose candidates are a [`eqx_norm.TrackingStats`][]).
        An approach updates a state with `running._replace(...)`, so that what it
        does not use passes through unchanged.
    """

    mean: Float[Array, " channels"]
    var: Float[Array, " channels"]
    counter: Int[Array, ""]
    extra: Any = None


class AbstractApproach(eqx.Module):
    """The interface of a statistics strategy: how a training batch is normalised,
    how the running statistics evolve, what inference uses, and how statistics are
    stored. [`eqx_norm.BatchNorm`][] calls these and nothing else.

    Subclass [`eqx_norm.Approach`][] (which stores the statistics inference uses,
    as every built-in approach but [`eqx_norm.Tracking`][] does) and write `train`;
    subclass this directly for a strategy that keeps more in its state.

    **Attributes:**

    - `needs_batch_variance`: a class variable: whether training needs a batch
        variance, i.e. more than one value per channel.
    """

    if TYPE_CHECKING:  # pyright reads `AbstractClassVar` as an instance field
        needs_batch_variance: ClassVar[bool]
    else:
        needs_batch_variance: AbstractClassVar[bool]

    @abc.abstractmethod
    def init(self, input_size: int, dtype) -> RunningStats:
        """The running statistics before any training step.

        **Arguments:**

        - `input_size`: the number of channels.
        - `dtype`: the floating dtype of the statistics (float32 or wider).

        **Returns:**

        A [`eqx_norm.RunningStats`][].
        """

    @abc.abstractmethod
    def train(
        self, batch: BatchStats, running: RunningStats, momentum: float, eps: float
    ) -> tuple[Float[Array, " channels"], Float[Array, " channels"], RunningStats]:
        """One training step.

        **Arguments:**

        - `batch`: this batch's [`eqx_norm.BatchStats`][]. Its `mean` and `var` carry
            gradients: whatever share of them the returned statistics contain is
            what gradients flow through.
        - `running`: the running statistics before this step.
        - `momentum`: the layer's momentum (the weight of the old value).
        - `eps`: the layer's eps; the output is `(x - mean) / sqrt(var + eps)`.

        **Returns:**

        A 3-tuple `(mean, var, new_running)`: the statistics that normalise this
        batch, and the running statistics after this step.
        """

    @abc.abstractmethod
    def infer(
        self, running: RunningStats, momentum: float
    ) -> tuple[Float[Array, " channels"], Float[Array, " channels"]]:
        """The statistics inference uses, from the running statistics.

        **Arguments:**

        - `running`: the running statistics.
        - `momentum`: the layer's momentum.

        **Returns:**

        A 2-tuple `(mean, var)`.
        """

    @abc.abstractmethod
    def with_statistics(
        self,
        running: RunningStats,
        mean: Float[Array, " channels"],
        var: Float[Array, " channels"],
        counter: Int[Array, ""],
    ) -> RunningStats:
        """The running statistics with the statistics that inference uses replaced:
        what [`eqx_norm.BatchNorm.set_statistics`][], [`eqx_norm.recalibrate`][] and
        [`eqx_norm.match_state`][] store.

        **Arguments:**

        - `running`: the running statistics now, of this approach's structure.
        - `mean`, `var`: the statistics inference is to use.
        - `counter`: the step counter to store.

        **Returns:**

        The new [`eqx_norm.RunningStats`][].
        """


class AbstractStoredApproach(AbstractApproach):
    """A strategy whose state stores the statistics inference uses (mean 0,
    variance 1 before any step), as every built-in approach but
    [`eqx_norm.Tracking`][]: so that one model switches between them on the same
    state. Its subclasses write `train` and set `needs_batch_variance`."""

    def init(self, input_size: int, dtype) -> RunningStats:
        """The running statistics before any training step.

        **Arguments:**

        - `input_size`: the number of channels.
        - `dtype`: the floating dtype of the statistics (float32 or wider).

        **Returns:**

        A [`eqx_norm.RunningStats`][]: mean 0, variance 1, counter 0, so that inference
        before any training step is the identity (before the affine transform).
        """
        return RunningStats(
            mean=jnp.zeros((input_size,), dtype),
            var=jnp.ones((input_size,), dtype),
            counter=jnp.array(0, jnp.int32),
        )

    def infer(
        self, running: RunningStats, momentum: float
    ) -> tuple[Float[Array, " channels"], Float[Array, " channels"]]:
        """The statistics inference uses, from the running statistics.

        **Arguments:**

        - `running`: the running statistics.
        - `momentum`: the layer's momentum.

        **Returns:**

        A 2-tuple `(mean, var)`. The stored mean and variance.
        """
        return running.mean, running.var

    def with_statistics(
        self,
        running: RunningStats,
        mean: Float[Array, " channels"],
        var: Float[Array, " channels"],
        counter: Int[Array, ""],
    ) -> RunningStats:
        """As [`eqx_norm.AbstractApproach.with_statistics`][]: `mean`, `var` and
        `counter` stored as they are, `extra` kept (what inference reads is what is
        stored)."""
        return running._replace(mean=mean, var=var, counter=counter)


class Approach(AbstractStoredApproach):
    """The base class of a statistics strategy: how a training batch is normalised,
    how the running statistics evolve, and what inference uses.

    Subclass it and write `train` to make a strategy of your own; the layer needs
    nothing else:

    ```python
    class HalfAndHalf(eqx_norm.Approach):
        # Normalise with the average of batch and running statistics.
        def train(self, batch, running, momentum, eps):
            mean = 0.5 * (batch.mean + running.mean)
            var = 0.5 * (batch.var + running.var)
            new = eqx_norm.RunningStats(
                momentum * running.mean + (1 - momentum) * batch.mean,
                momentum * running.var + (1 - momentum) * batch.var,
                running.counter + 1,
            )
            return mean, var, new

    bn = eqx_norm.BatchNorm(8, "batch", approach=HalfAndHalf())
    ```

    Hyperparameters of a strategy should be `eqx.field(static=True)`.

    `momentum` and `eps` belong to the layer, not the strategy, and are passed to
    every `train`: a model switched to another approach and back (by
    [`eqx_norm.set_approach`][] or [`eqx_norm.freeze`][]) keeps them. A strategy uses
    what it needs and ignores the rest. The state stores the statistics inference
    uses, as for the built-in approaches (`init`, `infer` and `with_statistics` are
    [`eqx_norm.AbstractStoredApproach`][]'s); a strategy that keeps more subclasses
    [`eqx_norm.AbstractApproach`][] instead.
    """

    needs_batch_variance: ClassVar[bool] = True
    """Whether training needs a batch variance (more than one value per channel):
    `True` unless a subclass says otherwise."""
