"""Training steps of the MNIST CNN (batch 64): one SAM step against one plain step
(two passes are the floor, 2x), and the CNN with eqx_norm.BatchNorm against the same
CNN with eqx.nn.BatchNorm, all jitted, interleaved; ratios are medians of per-round
ratios.

    python benchmarks/bench_training.py [--rounds 30]
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _timing import compile_seconds, interleaved, median, ratio, table

import eqx_norm
from eqx_norm import data, experiments

loss_fn = experiments.loss_fn


def _step(model, state, optimizer, x, y):
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = eqx_norm.sam_step(loss_fn, optimizer)
    args = (model, state, opt_state, x, y)
    dynamic, static = eqx.partition(args, eqx.is_array)
    jitted = jax.jit(lambda d: eqx.filter(step(*eqx.combine(d, static)), eqx.is_array))
    return jitted, dynamic


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    images, labels = data.load_dataset("digits", "train")
    x, y = jnp.asarray(images[:64]), jnp.asarray(labels[:64])
    key = jax.random.key(0)
    model, state = eqx.nn.make_with_state(experiments.CNN)("batch", key=key)
    eqx_model, eqx_state = eqx.nn.make_with_state(experiments.CNN)("batch", key=key)
    # The same CNN with Equinox's own BatchNorm in place of ours.
    eqx_model = eqx.tree_at(
        lambda m: m.norm, eqx_model, eqx.nn.BatchNorm(512, "batch", mode="batch")
    )
    eqx_model, eqx_state = eqx.nn.make_with_state(lambda: eqx_model)()
    adam = optax.adam(3e-3)
    programs = {
        "plain step (eqx_norm)": _step(model, state, adam, x, y),
        "SAM step (eqx_norm)": _step(model, state, eqx_norm.sam(adam), x, y),
        "plain step (eqx.nn.BatchNorm)": _step(eqx_model, eqx_state, adam, x, y),
    }
    compile_s = {}
    for name, (fn, dyn) in programs.items():
        compile_s[name], _ = compile_seconds(fn, dyn)
    times = interleaved(
        {
            name: (lambda fn=fn, dyn=dyn: fn(dyn))
            for name, (fn, dyn) in programs.items()
        },
        rounds=args.rounds,
    )
    plain = "plain step (eqx_norm)"
    print(
        f"# MNIST CNN training step, batch 64, {jax.default_backend()}, medians of "
        f"{args.rounds} interleaved rounds\n"
    )
    print(
        table(
            [
                [
                    k,
                    f"{median(v) * 1e3:.2f}",
                    f"{ratio(times, k, plain):.2f}",
                    f"{compile_s[k]:.2f}",
                ]
                for k, v in times.items()
            ],
            ["step", "ms", "/ plain eqx_norm step", "compile s"],
        )
    )
    print(
        f"\nSAM / plain: {ratio(times, 'SAM step (eqx_norm)', plain):.2f} (goal <= "
        "2.05); eqx_norm CNN / eqx.nn.BatchNorm CNN: "
        f"{ratio(times, plain, 'plain step (eqx.nn.BatchNorm)'):.2f} (goal <= 1.0)"
    )


if __name__ == "__main__":
    main()
