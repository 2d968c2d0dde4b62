"""Small helpers for `eqx.nn.State`, and the record a recording pass writes in it."""

from typing import NamedTuple

import equinox as eqx
import jax

from ._approaches import BatchStats, RunningStats


def copy_state(state: eqx.nn.State) -> eqx.nn.State:
    """A new `eqx.nn.State` holding the same arrays (nothing is copied at run time).

    `State.set` invalidates the object it was called on, so a state that is used
    more than once (the two passes of a SAM step, a tool's trial forward pass, a
    state the caller keeps) must be given to each use as its own copy.
    """
    return jax.tree.map(lambda a: a, state)


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
