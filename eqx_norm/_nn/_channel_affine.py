"""The served form of a BatchNorm that has no layer to fold into: its inference-mode
normalisation as a stateless per-channel affine map."""

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import channel_axis_of
from ._kernels import affine

_NO_STATE = object()


class ChannelAffine(eqx.Module):
    r"""A per-channel affine map, $y = x \cdot \text{scale} + \text{shift}$: what a
    BatchNorm computes in inference mode, with no state.

    [`eqx_norm.fold`][] puts one in place of each BatchNorm it cannot fold into the
    layer before it (one inside a custom block, or after an activation). It is
    called as the BatchNorm was: `y, state = bn(x, state)` returns the state it was
    given, unchanged, so that a block written as `h, state = self.bn1(h, state)`
    runs as it is; called without a state (inside an `eqx.nn.Sequential` with no
    stateful layer left, say), it returns `y` alone. It computes exactly what the
    BatchNorm's inference computes, in the same arithmetic.

    **Attributes:**

    - `scale`, `shift`: per channel, shape `(input_size,)`.
    - `channel_axis`: the axis of each example that holds the channels, as in
        [`eqx_norm.BatchNorm`][].
    """

    scale: Float[Array, " channels"]
    shift: Float[Array, " channels"]
    channel_axis: int = eqx.field(static=True, default=0)

    def __call__(
        self,
        x: Array,
        state=_NO_STATE,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        mask: Array | None = None,
    ):
        """**Arguments:**

        - `x`: one example, with its channels on `channel_axis`.
        - `state`: optional; returned unchanged beside the output.
        - `key`, `inference`, `mask`: ignored (a BatchNorm in inference mode ignores
            them too), for the BatchNorm's call signature.

        **Returns:**

        `(y, state)` when called with a state, else `y`: the same shape and dtype as
        `x`.
        """
        del key, inference, mask
        axis = channel_axis_of(x, self.scale.shape[0], self.channel_axis)
        y = affine(x, self.scale, self.shift, axis)
        return y if state is _NO_STATE else (y, state)
