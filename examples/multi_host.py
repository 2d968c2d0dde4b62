"""Train the MNIST CNN with synchronised BatchNorm and SAM across several processes
(hosts), each process reading its own rows of every batch.

    # On this machine, 2 processes of 4 CPU devices:
    .venv/bin/python examples/multi_host.py --processes 2
    # On every host of a Cloud TPU, SLURM or Open MPI cluster:
    python examples/multi_host.py

With `--processes N`, this script starts N processes on this machine and joins them
with `jax.distributed.initialize("127.0.0.1:PORT", N, i)`, as hosts of a cluster
are joined. Without it, it calls `jax.distributed.initialize()`, which finds the
coordinator, the process count and this process's index on Cloud TPU, SLURM and
Open MPI (elsewhere, set `JAX_COORDINATOR_ADDRESS` and pass `num_processes` and
`process_id`).

Every process builds the same mesh over all devices of all processes, draws the
same batch indices (the same seed), and loads only its block of them: process `i`
of `P` holds rows `i * n / P` to `(i + 1) * n / P` of the global batch of `n`.
`eqx_norm.shard_batch(..., process_local=True)` makes the global batch from those
blocks, and the step, compiled once with `jax.jit`, gives the BatchNorm statistics
and SAM gradients of the global batch: the same numbers as one process. At the end,
every process calls `eqx_norm.save`, which writes one checkpoint (by default
`results/multi_host.eqx` under the working folder, the same path on every process).
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="N",
        help="start N processes on this machine and join them; 0 for one process "
        "of a cluster, which JAX finds on Cloud TPU, SLURM and Open MPI",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=4,
        metavar="N",
        help="CPU devices in each process started with --processes",
    )
    parser.add_argument(
        "--steps", type=int, default=200, metavar="N", help="SAM steps to train"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="the global batch: the rows of all processes together",
    )
    parser.add_argument(
        "--rho", type=float, default=0.05, help="SAM's radius, rho of eqx_norm.sam"
    )
    parser.add_argument(
        "--dataset",
        default="digits",
        metavar="NAME",
        help="digits (bundled), mnist or fashion-mnist, as "
        "eqx_norm.data.load_dataset reads them",
    )
    parser.add_argument(
        "--checkpoint",
        default="results/multi_host.eqx",
        metavar="PATH",
        help="the checkpoint, one file that every process saves together (its "
        "folder is made if missing); on a cluster, a path that names the same file "
        "on every host, on a file system they share",
    )
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=30,
        metavar="SECONDS",
        help="after this long, a process that stopped is declared dead and the "
        "others stop with an error",
    )
    parser.add_argument("--timeout", type=float, default=1800, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = make_parser().parse_args()
    if args.processes and args.process_id is None:
        sys.exit(launch_here(args))
    train(args)


# What Gloo, JAX's collectives on the CPU, prints as each process connects: one line
# per device and per group of devices, sixteen for two processes of four devices.
GLOO_CONNECTED = re.compile(rb"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\b")


def relay(source: IO[bytes], target: IO[bytes]) -> None:
    """Copy a child's output to ours line by line: every line, errors included,
    but Gloo's connection lines."""
    for line in source:
        if not GLOO_CONNECTED.match(line):
            target.write(line)
            target.flush()


def launch_here(args: argparse.Namespace) -> int:
    """Start `args.processes` processes of this script on this machine, wait for
    them (at most `args.timeout` seconds, then end each by its pid), and return the
    first failure's exit status, or 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the devices come from --devices
    children = [
        subprocess.Popen(
            [sys.executable, *sys.argv]
            + ["--process-id", str(i), "--coordinator", f"127.0.0.1:{port}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(args.processes)
    ]
    relays = [
        threading.Thread(target=relay, args=(source, target), daemon=True)
        for child in children
        for source, target in [
            (child.stdout, sys.stdout.buffer),
            (child.stderr, sys.stderr.buffer),
        ]
    ]
    for thread in relays:
        thread.start()
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            if all(child.poll() is not None for child in children):
                break
            if any(child.poll() not in (None, 0) for child in children):
                # One failed: the others stop within the heartbeat timeout.
                deadline = min(deadline, time.monotonic() + 2 * args.heartbeat + 10)
            time.sleep(0.1)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
        for thread in relays:
            thread.join()
    return next((c.returncode for c in children if c.returncode), 0)


def train(args: argparse.Namespace) -> None:
    import jax

    if args.process_id is None:  # a cluster: JAX finds the coordinator
        jax.distributed.initialize(heartbeat_timeout_seconds=args.heartbeat)
    else:
        jax.config.update("jax_num_cpu_devices", args.devices)
        jax.distributed.initialize(
            args.coordinator,
            num_processes=args.processes,
            process_id=args.process_id,
            heartbeat_timeout_seconds=args.heartbeat,
            shutdown_timeout_seconds=args.heartbeat,
        )

    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType

    import eqx_norm
    from eqx_norm import data, experiments

    processes, me = jax.process_count(), jax.process_index()
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    images, labels = data.load_dataset(args.dataset, "train")
    test_images, test_labels = data.load_dataset(args.dataset, "test")

    def mine(rows: np.ndarray) -> np.ndarray:
        """This process's block of a global batch's row indices."""
        n = len(rows) // processes
        return rows[me * n : (me + 1) * n]

    model, state = eqx.nn.make_with_state(experiments.CNN)(
        "batch", key=jax.random.key(0)
    )
    optimizer = eqx_norm.sam(optax.adam(3e-3), rho=args.rho)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    model, state, opt_state = eqx_norm.replicate((model, state, opt_state), mesh)
    step = eqx.filter_jit(eqx_norm.sam_step(experiments.loss_fn, optimizer))

    rng = np.random.default_rng(0)  # the same on every process
    start = time.perf_counter()
    for t in range(args.steps):
        rows = mine(rng.choice(len(images), args.batch_size, replace=False))
        x, y = eqx_norm.shard_batch(
            (images[rows], labels[rows]), mesh, process_local=True
        )
        model, state, opt_state, loss = step(model, state, opt_state, x, y)
        if me == 0 and (t % 50 == 0 or t == args.steps - 1):
            print(f"step {t:4d}  loss {float(loss):.4f}", flush=True)
    seconds = time.perf_counter() - start

    inference = eqx.nn.inference_mode(model)
    rows = mine(np.arange(len(test_images) // devices * devices))
    x, y = eqx_norm.shard_batch(
        (test_images[rows], test_labels[rows]), mesh, process_local=True
    )

    @eqx.filter_jit
    def accuracy(model, state, x, y):
        log_probs, _, _ = jax.vmap(
            model, in_axes=(0, None), out_axes=(0, None, 0), axis_name="batch"
        )(x, state)
        return jnp.mean(jnp.argmax(log_probs, axis=1) == y)

    correct = accuracy(inference, state, x, y)
    Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    eqx_norm.save(args.checkpoint, model, state)  # on every process: one file
    if me == 0:
        print(
            f"{processes} processes, {devices} devices, {args.steps} SAM steps of "
            f"{args.batch_size} in {seconds:.1f} s; saved {args.checkpoint}; "
            f"test accuracy {float(correct):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
