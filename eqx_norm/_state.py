"""`eqx.nn.State` helpers that the layer, the SAM family and the tools share."""

import equinox as eqx
import jax


def copy_state(state: eqx.nn.State) -> eqx.nn.State:
    """A new `eqx.nn.State` holding the same arrays (nothing is copied at run time).

    `State.set` invalidates the object it was called on, so a state that is used
    more than once (the two passes of a SAM step, a tool's trial forward pass, a
    state the caller keeps) must be given to each use as its own copy.
    """
    return jax.tree.map(lambda a: a, state)
