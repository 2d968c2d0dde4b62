"""Inference of models with BatchNorm, folded (`eqx_norm.fold`, `eqx_norm.fold_into`)
against unfolded, all jitted, interleaved in one process; ratios are medians of the
per-round ratios of the folded time over the unfolded.

    python benchmarks/bench_fold.py [--rounds 30]
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
from _timing import interleaved, median, ratio, rounds_parser, table

import eqx_norm
from eqx_norm import experiments


def _deep(key, channels=32, blocks=6):
    """A Conv-BN-ReLU stack on (3, 32, 32) examples, then a linear classifier."""
    keys = jax.random.split(key, blocks + 2)
    layers = [eqx.nn.Conv2d(3, channels, 3, padding=1, use_bias=False, key=keys[0])]
    layers += [eqx_norm.BatchNorm(channels, "batch"), eqx.nn.Lambda(jax.nn.relu)]
    for k in keys[1:-1]:
        layers += [
            eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k),
            eqx_norm.BatchNorm(channels, "batch"),
            eqx.nn.Lambda(jax.nn.relu),
        ]
    layers += [
        eqx.nn.Lambda(lambda x: jnp.mean(x, (1, 2))),
        eqx.nn.Linear(channels, 10, key=keys[-1]),
    ]
    return eqx.nn.Sequential(layers)


def _trained_state(model, state, x):
    """Statistics from one training-mode pass, so that they are not the initial."""
    _, state = jax.vmap(
        lambda xi, s: model(xi, s)[:2],
        in_axes=(0, None),
        out_axes=(0, None),
        axis_name="batch",
    )(x, state)
    return state


def _inference(model, state, x):
    model = eqx.nn.inference_mode(model)
    dynamic, static = eqx.partition((model, state), eqx.is_array)

    @jax.jit
    def run(dynamic, x):
        model, state = eqx.combine(dynamic, static)
        out = jax.vmap(lambda xi: model(xi, state)[0], axis_name="batch")(x)
        return out

    run(dynamic, x).block_until_ready()
    return lambda: run(dynamic, x)


def parser() -> argparse.ArgumentParser:
    parser = rounds_parser("Inference, folded against unfolded.")
    return parser


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    rows = []

    # The experiment's CNN (a custom module): fold its one BatchNorm by hand.
    key = jax.random.key(0)
    cnn, state = eqx.nn.make_with_state(experiments.CNN)("batch", key=key)
    x = jax.random.normal(jax.random.key(1), (256, 1, 28, 28))
    state = _trained_state(cnn, state, x)
    assert cnn.norm is not None
    folded = eqx.tree_at(
        lambda m: (m.fc1, m.norm),
        cnn,
        (eqx_norm.fold_into(cnn.fc1, cnn.norm, state), None),
        is_leaf=lambda v: v is None,
    )
    times = interleaved(
        {"unfolded": _inference(cnn, state, x), "folded": _inference(folded, state, x)},
        rounds=args.rounds,
    )
    rows.append(["experiment CNN, batch 256", times])

    deep, state = eqx.nn.make_with_state(_deep)(jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (64, 3, 32, 32))
    state = _trained_state(deep, state, x)
    folded_deep, folded_state = eqx_norm.fold(deep, state)
    times = interleaved(
        {
            "unfolded": _inference(deep, state, x),
            "folded": _inference(folded_deep, folded_state, x),
        },
        rounds=args.rounds,
    )
    rows.append(["6 x Conv-BN-ReLU (32 ch), batch 64, 32x32", times])

    print(
        f"# Inference, folded against unfolded, {jax.default_backend()}, medians of "
        f"{args.rounds} interleaved rounds\n"
    )
    print(
        table(
            [
                [
                    name,
                    f"{median(t['unfolded']) * 1e3:.2f}",
                    f"{median(t['folded']) * 1e3:.2f}",
                    f"{ratio(t, 'folded', 'unfolded'):.2f}",
                ]
                for name, t in rows
            ],
            ["model", "unfolded ms", "folded ms", "folded / unfolded"],
        )
    )


if __name__ == "__main__":
    main()
