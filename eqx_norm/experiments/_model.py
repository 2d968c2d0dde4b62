import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .. import AbstractApproach, BatchNorm


class CNN(eqx.Module):
    """The small MNIST CNN of the Equinox BatchNorm-instability report:

    Conv2d(1 -> 3, kernel 4), MaxPool(2, stride 1), relu, Linear(1728 -> 512),
    [BatchNorm(512)], relu, Linear(512 -> 64), relu, Linear(64 -> 10), log_softmax.

    Called on one example of shape `(1, 28, 28)` with a state, it returns the log
    probabilities, the new state, and the output of the normalisation layer (or of
    the Linear layer where it would be), whose statistics the experiment plots.
    """

    conv: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    fc1: eqx.nn.Linear
    norm: BatchNorm | None
    fc2: eqx.nn.Linear
    fc3: eqx.nn.Linear

    def __init__(
        self,
        approach: str | AbstractApproach | None,
        momentum: float = 0.99,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `approach`: the BatchNorm approach, or `None` (or `"none"`) for no
            normalisation layer.
        - `momentum`: the BatchNorm momentum.
        - `key`: a JAX random key for the initial weights.
        """
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(1, 3, kernel_size=4, key=k1)
        self.pool = eqx.nn.MaxPool2d(kernel_size=2)
        self.fc1 = eqx.nn.Linear(1728, 512, key=k2)
        if approach is None or approach == "none":
            self.norm = None
        else:
            self.norm = BatchNorm(512, "batch", approach=approach, momentum=momentum)
        self.fc2 = eqx.nn.Linear(512, 64, key=k3)
        self.fc3 = eqx.nn.Linear(64, 10, key=k4)

    def __call__(
        self, x: Float[Array, "1 28 28"], state: eqx.nn.State
    ) -> tuple[Float[Array, "10"], eqx.nn.State, Float[Array, "512"]]:
        h = jax.nn.relu(self.pool(self.conv(x)))
        h = self.fc1(jnp.ravel(h))
        if self.norm is not None:
            h, state = self.norm(h, state)
        out = h
        h = jax.nn.relu(self.fc2(jax.nn.relu(h)))
        return jax.nn.log_softmax(self.fc3(h)), state, out


def batch_forward(
    model: CNN, state: eqx.nn.State, x: Float[Array, "batch 1 28 28"]
) -> tuple[Float[Array, "batch 10"], eqx.nn.State, Float[Array, "batch 512"]]:
    """The CNN over a batch (vmapped over the axis `"batch"` that its BatchNorm
    reduces over): log probabilities, the new state, and the normalisation layer's
    output per example."""
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None, 0), axis_name="batch")(
        x, state
    )


def cross_entropy(log_probs: Float[Array, "batch 10"], labels: Array) -> Array:
    """The mean cross-entropy of log probabilities against integer labels."""
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def loss_fn(
    model: CNN, state: eqx.nn.State, x: Float[Array, "batch 1 28 28"], y: Array
) -> tuple[Array, eqx.nn.State]:
    """The CNN's training loss on a batch, as [`eqx_norm.sam_step`][] takes it:
    `(mean cross-entropy, new state)`."""
    log_probs, state, _ = batch_forward(model, state, x)
    return cross_entropy(log_probs, y), state
