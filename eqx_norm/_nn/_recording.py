"""The entry a BatchNorm layer has in a recording pass's state: what
`recalibrate` and `diagnose` measure with."""

from typing import NamedTuple

from ._approach import BatchStats, RunningStats


class Recording(NamedTuple):
    """A BatchNorm layer's state entry in a recording pass (the pass that
    [`eqx_norm.recalibrate`][] and [`eqx_norm.diagnose`][] measure with).

    A training call finding a `Recording` in its place of the state normalises
    from `running` as usual, leaves `running` as it is, and writes the statistics
    of its batch (those the running statistics would be updated from) into `batch`,
    unguarded: the output of the pass is the state, and the tool reads them there.

    **Attributes:**

    - `running`: the layer's running statistics.
    - `batch`: the statistics of the batch of the last training call, with `n` an
        int32 scalar; before any call, `n` is -1.
    """

    running: RunningStats
    batch: BatchStats
