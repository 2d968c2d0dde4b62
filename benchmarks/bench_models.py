"""Whole training steps of models users train, each built three times: with
eqx_norm.BatchNorm, with eqx.nn.BatchNorm (mode="batch"), and as a Flax linen model
with Flax's BatchNorm in its native channels-last layout. One step is the forward
and backward pass, the Adam update and the BatchNorm state update, under jax.jit.

    python benchmarks/bench_models.py [--rounds 30] [--models mlp cnn resnet]
        [--batch N] [--compiles 3] [--calls 1]

Models: (a) an MLP 784-512-BN-ReLU-512-BN-ReLU-10 at batch 128; (b) the
experiment's CNN (Conv 1->3, MaxPool, Linear 1728->512, BN, Linear 512->64,
Linear 64->10) at batch 64; (c) a small residual CNN (three stages of two
Conv-BN-ReLU residual blocks with 16/32/64 channels, 32x32x3 input) at batch 64,
also with `eqx_norm.BatchNorm(compute_channels_last=True)`. Every model also runs
with `approach="tracking"`, whose step is printed relative to the default's.

Printed: the step time of each relative to eqx_norm's (medians of per-round ratios,
interleaved); what BatchNorm costs in the step ("BN ms": the median step less the
median step of the same framework's model without normalisation, also timed); the
median of three fresh compiles relative to eqx_norm's; XLA's temporary memory of
each compiled step; and the number of kernels XLA:CPU runs (top-level instructions
of the compiled program other than parameters, constants, tuples and bitcasts).
"""

import argparse
import statistics
from collections.abc import Callable

import _timing as timing
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import eqx_norm

PEERS = ("eqx_norm", "equinox", "flax")
CHANNELS_LAST = "eqx_norm, channels-last compute"
TRACKING = 'eqx_norm, approach="tracking"'


class NoNorm(eqx.Module):
    """No normalisation, for the floor: the model's step without BatchNorm."""

    def __call__(self, x, state):
        return x, state


def norm_layer(kind: str, channels: int):
    if kind == "none":
        return NoNorm()
    if kind == "eqx_norm":
        return eqx_norm.BatchNorm(channels, "batch", momentum=0.9)
    if kind == TRACKING:
        return eqx_norm.BatchNorm(channels, "batch", approach="tracking", momentum=0.9)
    if kind == CHANNELS_LAST:
        return eqx_norm.BatchNorm(
            channels, "batch", momentum=0.9, compute_channels_last=True
        )
    return eqx.nn.BatchNorm(channels, "batch", momentum=0.9, mode="batch")


# ------------------------------------------------------------ Equinox models


class MLP(eqx.Module):
    layers: tuple

    def __init__(self, norm: str, key):
        k = jax.random.split(key, 3)
        self.layers = (
            eqx.nn.Linear(784, 512, use_bias=False, key=k[0]),
            norm_layer(norm, 512),
            eqx.nn.Linear(512, 512, use_bias=False, key=k[1]),
            norm_layer(norm, 512),
            eqx.nn.Linear(512, 10, key=k[2]),
        )

    def __call__(self, x, state):
        lin1, bn1, lin2, bn2, out = self.layers
        x, state = bn1(lin1(jnp.ravel(x)), state)
        x, state = bn2(lin2(jax.nn.relu(x)), state)
        return out(jax.nn.relu(x)), state


class CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    fc1: eqx.nn.Linear
    norm: eqx.Module
    fc2: eqx.nn.Linear
    fc3: eqx.nn.Linear

    def __init__(self, norm: str, key):
        k = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(1, 3, kernel_size=4, key=k[0])
        self.fc1 = eqx.nn.Linear(1728, 512, key=k[1])
        self.norm = norm_layer(norm, 512)
        self.fc2 = eqx.nn.Linear(512, 64, key=k[2])
        self.fc3 = eqx.nn.Linear(64, 10, key=k[3])

    def __call__(self, x, state):
        h = jax.nn.relu(eqx.nn.MaxPool2d(2)(self.conv(x)))
        h, state = self.norm(self.fc1(jnp.ravel(h)), state)
        h = jax.nn.relu(self.fc2(jax.nn.relu(h)))
        return self.fc3(h), state


class Block(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn1: eqx.Module
    conv2: eqx.nn.Conv2d
    bn2: eqx.Module
    skip: eqx.nn.Conv2d | None

    def __init__(self, norm: str, cin: int, cout: int, stride: int, key):
        k = jax.random.split(key, 3)
        conv = dict(kernel_size=3, padding=1, use_bias=False)
        self.conv1 = eqx.nn.Conv2d(cin, cout, stride=stride, key=k[0], **conv)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = eqx.nn.Conv2d(cout, cout, key=k[1], **conv)
        self.bn2 = norm_layer(norm, cout)
        self.skip = (
            eqx.nn.Conv2d(cin, cout, 1, stride=stride, use_bias=False, key=k[2])
            if stride != 1 or cin != cout
            else None
        )

    def __call__(self, x, state):
        h, state = self.bn1(self.conv1(x), state)
        h, state = self.bn2(self.conv2(jax.nn.relu(h)), state)
        skip = x if self.skip is None else self.skip(x)
        return jax.nn.relu(h + skip), state


class ResNet(eqx.Module):
    stem: eqx.nn.Conv2d
    bn: eqx.Module
    blocks: tuple
    head: eqx.nn.Linear

    def __init__(self, norm: str, key):
        k = jax.random.split(key, 8)
        self.stem = eqx.nn.Conv2d(3, 16, 3, padding=1, use_bias=False, key=k[0])
        self.bn = norm_layer(norm, 16)
        blocks, cin, i = [], 16, 1
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for s in (stride, 1):
                blocks.append(Block(norm, cin, cout, s, k[i]))
                cin, i = cout, i + 1
        self.blocks = tuple(blocks)
        self.head = eqx.nn.Linear(64, 10, key=k[7])

    def __call__(self, x, state):
        h, state = self.bn(self.stem(x), state)
        h = jax.nn.relu(h)
        for block in self.blocks:
            h, state = block(h, state)
        return self.head(jnp.mean(h, axis=(1, 2))), state


def _cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def equinox_step(model_cls, norm: str, x, y):
    """A jitted step of an Equinox model and its arrays, as `(jitted, args)`."""
    model, state = eqx.nn.make_with_state(model_cls)(norm, jax.random.key(0))
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(params, state, opt_state, x, y):
        def loss(params):
            batch_model = jax.vmap(
                eqx.combine(params, static),
                in_axes=(0, None),
                out_axes=(0, None),
                axis_name="batch",
            )
            logits, new_state = batch_model(x, state)
            return _cross_entropy(logits, y), new_state

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, value

    return jax.jit(step, donate_argnums=()), (params, state, opt_state, x, y)


# --------------------------------------------------------------- Flax models


def flax_norm(norm: bool, train: bool):
    if not norm:
        return lambda x: x
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)


class FlaxMLP(nn.Module):
    norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.reshape((x.shape[0], -1))
        for _ in range(2):
            x = nn.Dense(512, use_bias=False)(x)
            x = nn.relu(flax_norm(self.norm, train)(x))
        return nn.Dense(10)(x)


class FlaxCNN(nn.Module):
    norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.Conv(3, (4, 4), padding="VALID")(x)
        h = nn.relu(nn.max_pool(h, (2, 2), strides=(1, 1)))
        h = nn.Dense(512)(h.reshape((h.shape[0], -1)))
        h = flax_norm(self.norm, train)(h)
        h = nn.relu(nn.Dense(64)(nn.relu(h)))
        return nn.Dense(10)(h)


class FlaxBlock(nn.Module):
    channels: int
    stride: int
    norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = True):
        bn = lambda: flax_norm(self.norm, train)  # noqa: E731
        s = (self.stride, self.stride)
        h = nn.Conv(self.channels, (3, 3), s, padding=1, use_bias=False)(x)
        h = nn.relu(bn()(h))
        h = bn()(nn.Conv(self.channels, (3, 3), padding=1, use_bias=False)(h))
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), s, use_bias=False)(x)
        return nn.relu(h + x)


class FlaxResNet(nn.Module):
    norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)
        h = nn.relu(flax_norm(self.norm, train)(h))
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            for s in (stride, 1):
                h = FlaxBlock(channels, s, self.norm)(h, train)
        return nn.Dense(10)(jnp.mean(h, axis=(1, 2)))


def flax_step(module, x, y):
    """A jitted step of a Flax model on channels-last input, as `(jitted, args)`."""
    x = jnp.moveaxis(x, 1, -1) if x.ndim == 4 else x
    variables = module.init(jax.random.key(0), x)
    params, stats = variables["params"], variables.get("batch_stats", {})
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    def step(params, stats, opt_state, x, y):
        def loss(params):
            logits, updates = module.apply(
                {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            return _cross_entropy(logits, y), updates.get("batch_stats", {})

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, value

    return jax.jit(step), (params, stats, opt_state, x, y)


MODELS = {
    "mlp": ("MLP 784-512-BN-512-BN-10", MLP, FlaxMLP, (128, 1, 28, 28)),
    "cnn": ("experiment's CNN", CNN, FlaxCNN, (64, 1, 28, 28)),
    "resnet": ("residual CNN 16/32/64", ResNet, FlaxResNet, (64, 3, 32, 32)),
}

SPATIAL = ("resnet",)  # the models whose BatchNorms see spatial axes


def builds(name: str, batch: int | None = None) -> dict[str, Callable[[], tuple]]:
    _, eqx_cls, flax_cls, shape = MODELS[name]
    if batch is not None:
        shape = (batch,) + shape[1:]
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, shape)
    y = jax.random.randint(ky, (shape[0],), 0, 10)
    peers = {
        "eqx_norm": lambda: equinox_step(eqx_cls, "eqx_norm", x, y),
        "equinox": lambda: equinox_step(eqx_cls, "equinox", x, y),
        "flax": lambda: flax_step(flax_cls(), x, y),
        TRACKING: lambda: equinox_step(eqx_cls, TRACKING, x, y),
        "equinox, no BN": lambda: equinox_step(eqx_cls, "none", x, y),
        "flax, no BN": lambda: flax_step(flax_cls(norm=False), x, y),
    }
    if name in SPATIAL:  # `compute_channels_last` moves nothing in the others
        peers[CHANNELS_LAST] = lambda: equinox_step(eqx_cls, CHANNELS_LAST, x, y)
    return peers


def bench_model(
    name: str,
    rounds: int,
    compiles: int = 3,
    batch: int | None = None,
    calls: int = 1,
):
    programs, compile_times, memory, counts = {}, {}, {}, {}
    for peer, build in builds(name, batch).items():
        seconds = []
        for _ in range(compiles):  # fresh compiles: a new jit object each time
            jitted, args = build()
            took, compiled = timing.compile_seconds(jitted, *args)
            seconds.append(took)
        compile_times[peer] = statistics.median(seconds)
        memory[peer] = timing.temp_bytes(compiled)
        counts[peer] = timing.kernels(compiled)
        programs[peer] = lambda compiled=compiled, args=args: compiled(*args)
    times = timing.interleaved(programs, rounds=rounds, calls=calls)
    floor = {"eqx_norm": "equinox, no BN", "equinox": "equinox, no BN"}
    floor[CHANNELS_LAST] = floor[TRACKING] = "equinox, no BN"
    floor["flax"] = "flax, no BN"
    rows = []
    for peer in programs:
        cost = "-"
        if peer in floor:
            bn = timing.median(times[peer]) - timing.median(times[floor[peer]])
            cost = f"{bn * 1e3:.2f}"
        rows.append(
            [
                peer,
                f"{timing.median(times[peer]) * 1e3:.2f}",
                f"{timing.ratio(times, peer, 'eqx_norm'):.2f}",
                cost,
                f"{compile_times[peer] / compile_times['eqx_norm']:.2f}",
                f"{memory[peer] / 2**20:.1f}",
                str(counts[peer]),
            ]
        )
    return rows, times


def parser() -> argparse.ArgumentParser:
    parser = timing.rounds_parser(
        "Whole training steps: eqx_norm against Equinox and Flax."
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=MODELS,
        help="models to run, each once",
    )
    parser.add_argument(
        "--batch",
        type=timing.at_least_two,
        help="a batch size for every model, at least 2 (default: each model's own)",
    )
    parser.add_argument(
        "--compiles", type=timing.positive_int, default=3, help="fresh compiles each"
    )
    parser.add_argument(
        "--calls",
        type=timing.positive_int,
        default=1,
        help="calls per sample, waiting once at the end (on a GPU: device time)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, every one checked before anything compiles: an argparse error
    naming the flag otherwise."""
    p = parser()
    args = p.parse_args(argv)
    timing.refuse_repeats(p, "--models", args.models)
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; medians of "
        f"{args.rounds} interleaved rounds of {args.calls} call(s)"
    )
    for name in args.models:
        rows, times = bench_model(
            name, args.rounds, args.compiles, args.batch, args.calls
        )
        ours = {p: timing.ratio(times, "eqx_norm", p) for p in PEERS[1:]}
        batch = args.batch or MODELS[name][3][0]
        print(
            f"\n{MODELS[name][0]}, batch {batch}: eqx_norm's step is "
            f"{ours['equinox']:.2f}x Equinox's, {ours['flax']:.2f}x Flax's"
        )
        print(
            'approach="tracking": its step is '
            f'{timing.ratio(times, TRACKING, "eqx_norm"):.3f}x approach="batch"\'s'
        )
        if CHANNELS_LAST in times:
            moved = {p: timing.ratio(times, CHANNELS_LAST, p) for p in PEERS[1:]}
            print(
                f"with compute_channels_last=True: {moved['equinox']:.2f}x Equinox's, "
                f"{moved['flax']:.2f}x Flax's"
            )
        print(
            timing.table(
                rows,
                [
                    "model",
                    "ms (median)",
                    "time / eqx_norm",
                    "BN ms",
                    "compile / eqx_norm",
                    "temp MiB",
                    "kernels",
                ],
            )
        )


if __name__ == "__main__":
    main()
