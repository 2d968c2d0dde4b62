"""Training steps of the MNIST CNN (batch 64): one SAM step against one plain step
(two passes are the floor, 2x), and the CNN with eqx_norm.BatchNorm against the same
CNN with eqx.nn.BatchNorm, all jitted, interleaved; ratios are medians of per-round
ratios.

    python benchmarks/bench_training.py [--rounds 30]

Also five consecutive steps of SAM, LookSAM (every=5), Momentum-SAM (one pass per
step: goal <= 1.1x plain), SAM over 4 micro-batches (one perturbation, or one per
micro-batch) against five plain steps.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _timing import (
    compile_seconds,
    interleaved,
    median,
    ratio,
    rounds_parser,
    table,
)

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


def _five_steps(
    model, state, optimizer, x, y, micro_batches=1, perturbation="whole-batch"
):
    """Five consecutive steps in one program (a `lax.scan`), so that LookSAM's
    one-in-five second pass is averaged over its period."""
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = eqx_norm.sam_step(
        loss_fn, optimizer, micro_batches=micro_batches, perturbation=perturbation
    )
    args = (model, state, opt_state)
    dynamic, static = eqx.partition(args, eqx.is_array)

    def body(dynamic, _):
        model, state, opt_state = eqx.combine(dynamic, static)
        model, state, opt_state, loss = step(model, state, opt_state, x, y)
        return eqx.filter((model, state, opt_state), eqx.is_array), loss

    jitted = jax.jit(lambda d: jax.lax.scan(body, d, None, length=5)[1])
    return jitted, dynamic


def cheaper_sam(model, state, x, y, rounds):
    """Five steps of: plain Adam, SAM, LookSAM (every=5), Momentum-SAM, and SAM
    (perturbed once, or per micro-batch) and plain Adam over 4 micro-batches."""
    adam = optax.adam(3e-3)
    programs = {
        "plain": _five_steps(model, state, adam, x, y),
        "SAM": _five_steps(model, state, eqx_norm.sam(adam), x, y),
        "LookSAM (every=5)": _five_steps(
            model, state, eqx_norm.looksam(adam, every=5), x, y
        ),
        "Momentum-SAM": _five_steps(model, state, eqx_norm.msam(adam, rho=1.0), x, y),
        "SAM, 4 micro-batches": _five_steps(
            model, state, eqx_norm.sam(adam), x, y, micro_batches=4
        ),
        "SAM per micro-batch, 4": _five_steps(
            model, state, eqx_norm.sam(adam), x, y, 4, "per-micro-batch"
        ),
        "plain, 4 micro-batches": _five_steps(model, state, adam, x, y, 4),
    }
    for fn, dyn in programs.values():
        jax.block_until_ready(fn(dyn))
    return interleaved(
        {k: (lambda fn=fn, dyn=dyn: fn(dyn)) for k, (fn, dyn) in programs.items()},
        rounds=rounds,
    )


def parser() -> argparse.ArgumentParser:
    parser = rounds_parser(
        "MNIST CNN training steps: SAM against plain, eqx_norm against Equinox."
    )
    return parser


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
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
    cheap = cheaper_sam(model, state, x, y, args.rounds)
    print("\n## Cheaper SAM: five steps of each, over five plain steps\n")
    print(
        table(
            [
                [k, f"{median(v) * 1e3 / 5:.2f}", f"{ratio(cheap, k, 'plain'):.2f}"]
                for k, v in cheap.items()
            ],
            ["step", "ms per step", "/ plain"],
        )
    )
    print(
        f"\nSAM / plain: {ratio(times, 'SAM step (eqx_norm)', plain):.2f} (goal <= "
        "2.05); eqx_norm CNN / eqx.nn.BatchNorm CNN: "
        f"{ratio(times, plain, 'plain step (eqx.nn.BatchNorm)'):.2f} (goal <= 1.0); "
        f"Momentum-SAM / plain: {ratio(cheap, 'Momentum-SAM', 'plain'):.2f} (goal <= "
        "1.1)"
    )


if __name__ == "__main__":
    main()
