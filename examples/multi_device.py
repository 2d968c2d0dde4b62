"""Train the MNIST CNN with synchronised BatchNorm and SAM on every available device.

    python examples/multi_device.py --steps 200
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/multi_device.py

The batch is split over a one-axis device mesh and the step is compiled once with
`jax.jit`: XLA's SPMD partitioner inserts one all-reduce per BatchNorm call (its
mean and second moment together) and the all-reduces of the gradients, so the
BatchNorm statistics and the SAM perturbation are those of the global batch, the
same numbers as on one device. On several hosts, call
`jax.distributed.initialize()` first and build the mesh over `jax.devices()`.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType

import eqx_norm
from eqx_norm import data, experiments

loss_fn = experiments.loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--dataset", default="digits", choices=data.DATASETS)
    args = parser.parse_args()

    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    images, labels = data.load_dataset(args.dataset, "train")
    test_images, test_labels = data.load_dataset(args.dataset, "test")

    model, state = eqx.nn.make_with_state(experiments.CNN)(
        "batch", key=jax.random.key(0)
    )
    optimizer = eqx_norm.sam(optax.adam(3e-3), rho=args.rho)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    model, state, opt_state = eqx_norm.replicate((model, state, opt_state), mesh)
    step = eqx.filter_jit(eqx_norm.sam_step(loss_fn, optimizer))

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for t in range(args.steps):
        idx = rng.choice(len(images), args.batch_size, replace=False)
        x, y = eqx_norm.shard_batch((images[idx], labels[idx]), mesh)
        model, state, opt_state, loss = step(model, state, opt_state, x, y)
        if t % 50 == 0 or t == args.steps - 1:
            print(f"step {t:4d}  loss {float(loss):.4f}")
    seconds = time.perf_counter() - start

    inference = eqx.nn.inference_mode(model)
    usable = len(test_images) // devices * devices
    x, y = eqx_norm.shard_batch((test_images[:usable], test_labels[:usable]), mesh)
    log_probs, _, _ = eqx.filter_jit(
        lambda m, s, x: jax.vmap(
            m, in_axes=(0, None), out_axes=(0, None, 0), axis_name="batch"
        )(x, s)
    )(inference, state, x)
    accuracy = float(jnp.mean(jnp.argmax(log_probs, axis=1) == y))
    print(
        f"{devices} devices, {args.steps} SAM steps of {args.batch_size} in "
        f"{seconds:.1f} s; test accuracy {accuracy:.3f}"
    )


if __name__ == "__main__":
    main()
