"""The lag experiment's models, written as a user writes them: a residual CNN of
custom blocks that call `h, state = self.bn(h, state)`, and an MLP."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ... import AbstractApproach, BatchNorm


class Block(eqx.Module):
    """A residual block: Conv 3x3, BatchNorm, relu, Conv 3x3, BatchNorm, plus the
    input, relu."""

    conv1: eqx.nn.Conv2d
    bn1: BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: BatchNorm

    def __init__(self, channels: int, approach, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv2d(
            channels, channels, 3, padding=1, use_bias=False, key=k1
        )
        self.bn1 = BatchNorm(channels, "batch", approach=approach)
        self.conv2 = eqx.nn.Conv2d(
            channels, channels, 3, padding=1, use_bias=False, key=k2
        )
        self.bn2 = BatchNorm(channels, "batch", approach=approach)

    def __call__(self, x: Array, state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
        h, state = self.bn1(self.conv1(x), state)
        h, state = self.bn2(self.conv2(jax.nn.relu(h)), state)
        return jax.nn.relu(h + x), state


class ResNet(eqx.Module):
    """A small residual CNN: a stem (Conv 3x3 1 -> 16, BatchNorm, relu, MaxPool 2)
    and two residual blocks of 16 channels, global average pooling and a Linear
    16 -> 10. Every convolution is followed by a BatchNorm of `approach`."""

    stem: eqx.nn.Conv2d
    bn: BatchNorm
    blocks: tuple[Block, Block]
    head: eqx.nn.Linear

    def __init__(
        self, approach: str | AbstractApproach = "batch", *, key: PRNGKeyArray
    ):
        keys = jax.random.split(key, 4)
        self.stem = eqx.nn.Conv2d(1, 16, 3, padding=1, use_bias=False, key=keys[0])
        self.bn = BatchNorm(16, "batch", approach=approach)
        self.blocks = (
            Block(16, approach, key=keys[1]),
            Block(16, approach, key=keys[2]),
        )
        self.head = eqx.nn.Linear(16, 10, key=keys[3])

    def __call__(
        self, x: Float[Array, "1 28 28"], state: eqx.nn.State
    ) -> tuple[Float[Array, "10"], eqx.nn.State]:
        h, state = self.bn(self.stem(x), state)
        h = eqx.nn.MaxPool2d(2, 2)(jax.nn.relu(h))
        for block in self.blocks:
            h, state = block(h, state)
        return self.head(jnp.mean(h, axis=(1, 2))), state


class MLP(eqx.Module):
    """Linear 784 -> 256, BatchNorm, relu, Linear 256 -> 256, BatchNorm, relu,
    Linear 256 -> 10."""

    fc1: eqx.nn.Linear
    bn1: BatchNorm
    fc2: eqx.nn.Linear
    bn2: BatchNorm
    fc3: eqx.nn.Linear

    def __init__(
        self, approach: str | AbstractApproach = "batch", *, key: PRNGKeyArray
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        self.fc1 = eqx.nn.Linear(784, 256, use_bias=False, key=k1)
        self.bn1 = BatchNorm(256, "batch", approach=approach)
        self.fc2 = eqx.nn.Linear(256, 256, use_bias=False, key=k2)
        self.bn2 = BatchNorm(256, "batch", approach=approach)
        self.fc3 = eqx.nn.Linear(256, 10, key=k3)

    def __call__(
        self, x: Float[Array, "1 28 28"], state: eqx.nn.State
    ) -> tuple[Float[Array, "10"], eqx.nn.State]:
        h, state = self.bn1(self.fc1(jnp.ravel(x)), state)
        h, state = self.bn2(self.fc2(jax.nn.relu(h)), state)
        return self.fc3(jax.nn.relu(h)), state


MODELS = {"resnet": ResNet, "mlp": MLP}
