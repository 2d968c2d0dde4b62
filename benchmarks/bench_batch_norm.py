"""BatchNorm training forward+backward under jax.jit: eqx_norm.BatchNorm against
eqx.nn.BatchNorm, Flax's BatchNorm (channels-last, its native layout) and an
elementwise proxy that reads and writes the same bytes, with eqx_norm's layer both
on the channels-first batch and on Flax's channels-last one (`channel_axis=-1`);
every approach against `batch`; compile time and peak temporary memory.

    python benchmarks/bench_batch_norm.py [--rounds 30] [--quick]
        [--shapes 256,64,56,56 ...] [--calls 1] [--options]
"""

import argparse
import platform

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from _timing import (
    compile_seconds,
    interleaved,
    kernels,
    median,
    parse_batch_shape,
    positive_int,
    ratio,
    refuse_repeats,
    rounds_parser,
    table,
    temp_bytes,
)

import eqx_norm

SHAPES = [(64, 512), (64, 64, 32, 32), (128, 256, 8, 8)]
GHOST = 16  # the ghost batch size of `bench_options`


def _jit(f, args):
    """jax.jit over the arrays of `args` (modules included) as one flat list, the
    rest closed over, so that every candidate is a plain compiled XLA program and
    the per-call Python cost (flattening an Equinox module or a Flax dict) is the
    same small list for all. In a training step that cost is paid once for the whole
    model, not per layer."""
    dynamic, static = eqx.partition(args, eqx.is_array)
    leaves, treedef = jax.tree.flatten(dynamic)

    def flat(leaves):
        return f(*eqx.combine(jax.tree.unflatten(treedef, leaves), static))

    return jax.jit(flat), (leaves,)


def _loss(y):
    return jnp.sum(jnp.square(y.astype(jnp.float32)))


def _equinox_style_step(bn, state, x, upstream=None):
    """Forward+backward of a per-example Equinox layer vmapped over the batch.

    The loss is `_loss(y)`, or with an `upstream` array `sum(y * upstream)`: then
    the gradient reaching the layer is that array, as if from a next layer, and not
    a function of `x` that XLA may recompute inside the layer's backward pass."""

    def f(bn, x, state, upstream):
        def loss(bn_and_x):
            bn, x = bn_and_x
            y, new_state = jax.vmap(
                bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
            )(x, state)
            if upstream is None:
                return _loss(y), new_state
            return jnp.sum(y.astype(jnp.float32) * upstream), new_state

        # Gradients for the parameters and the input, as inside a network (and as
        # Flax's step below).
        (_, new_state), grads = eqx.filter_value_and_grad(loss, has_aux=True)((bn, x))
        return grads, new_state

    return _jit(f, (bn, x, state, upstream))


def eqx_norm_step(x, approach="batch", upstream=None):
    bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(
        x.shape[1], "batch", approach=approach
    )
    return _equinox_style_step(bn, state, x, upstream)


def equinox_step(x):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        x.shape[1], "batch", mode="batch"
    )
    return _equinox_style_step(bn, state, x)


def flax_step(x):
    x_last = jnp.moveaxis(x, 1, -1)  # Flax's native layout: channels last
    # `dtype`: the output in the input's dtype, as the other layers give it (Flax
    # would otherwise promote a bfloat16 batch to a float32 output); statistics stay
    # float32 (Flax's `force_float32_reductions`).
    module = nn.BatchNorm(use_running_average=False, momentum=0.99, dtype=x.dtype)
    variables = module.init(jax.random.key(0), x_last)

    def f(params, stats, x):
        def loss(params, x):
            y, updates = module.apply(
                {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            return _loss(y), updates

        (_, updates), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, x
        )
        return grads, updates

    return _jit(f, (variables["params"], variables["batch_stats"], x_last))


def proxy_step(x):
    def f(x):
        return jax.grad(lambda x: _loss(1.5 * x + 0.5))(x)

    return _jit(f, (x,))


def _compile(build, times=3):
    """Build and compile a candidate `times` times from scratch (the first compile
    in a process also warms XLA up): the median seconds, the last callable, its
    arguments and its compiled program."""
    seconds = []
    while True:
        fn, args = build()
        s, program = compile_seconds(fn, *args)
        seconds.append(s)
        if len(seconds) == times:
            return median(seconds), fn, args, program


def bench_shape(shape, dtype, rounds, calls=1):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    builders = {
        "eqx_norm": lambda: eqx_norm_step(x),
        # The same layer on Flax's channels-last batch (`channel_axis=-1`).
        "eqx_norm, channels last": lambda: _options_step(
            jnp.moveaxis(x, 1, -1), None, channel_axis=-1
        ),
        "equinox": lambda: equinox_step(x),
        "flax": lambda: flax_step(x),
        "proxy": lambda: proxy_step(x),
    }
    compiled, compile_s, memory = {}, {}, {}
    for name, build in builders.items():
        compile_s[name], fn, args, program = _compile(build)
        memory[name] = temp_bytes(program)
        memory[f"{name} kernels"] = kernels(program)
        compiled[name] = lambda fn=fn, args=args: fn(*args)
    return interleaved(compiled, rounds=rounds, calls=calls), compile_s, memory


def bench_approaches(shape, rounds, upstream=False, calls=1):
    """Every approach's step; with `upstream`, on a given upstream gradient."""
    x = jax.random.normal(jax.random.key(0), shape)
    g = jax.random.normal(jax.random.key(1), shape) if upstream else None
    candidates = {}
    for approach in eqx_norm.APPROACHES:
        fn, args = eqx_norm_step(x, approach, g)
        fn(*args)
        candidates[approach] = lambda fn=fn, args=args: fn(*args)
    return interleaved(candidates, rounds=rounds, calls=calls)


def _options_step(x, mask, channel_axis=0, **kwargs):
    """`eqx_norm_step` with layer options, and a per-example `mask` if given."""
    bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(
        x.shape[1:][channel_axis], "batch", channel_axis=channel_axis, **kwargs
    )

    def f(bn, x, state, mask):
        def loss(bn_and_x):
            bn, x = bn_and_x
            y, new_state = jax.vmap(
                lambda xi, mi, s: bn(xi, s, mask=mi),
                in_axes=(0, None if mask is None else 0, None),
                out_axes=(0, None),
                axis_name="batch",
            )(x, mask, state)
            return _loss(y), new_state

        (_, new_state), grads = eqx.filter_value_and_grad(loss, has_aux=True)((bn, x))
        return grads, new_state

    return _jit(f, (bn, x, state, mask))


def bench_options(shape, rounds, calls=1):
    """What a mask and ghost batches cost over plain training."""
    x = jax.random.normal(jax.random.key(0), shape)
    mask = jax.random.uniform(jax.random.key(1), (shape[0],) + shape[2:]) < 0.9
    builders = {
        "plain": lambda: _options_step(x, None),
        "mask": lambda: _options_step(x, mask),
        f"ghost {GHOST}": lambda: _options_step(x, None, virtual_batch_size=GHOST),
        f"ghost {GHOST} + mask": lambda: _options_step(
            x, mask, virtual_batch_size=GHOST
        ),
        "channels last": lambda: _options_step(
            jnp.moveaxis(x, 1, -1), None, channel_axis=-1
        ),
        # On a channels-first batch given as it is: the copies it adds.
        "compute_channels_last": lambda: _options_step(
            x, None, compute_channels_last=True
        ),
    }
    candidates = {}
    for name, build in builders.items():
        fn, args = build()
        fn(*args)
        candidates[name] = lambda fn=fn, args=args: fn(*args)
    return interleaved(candidates, rounds=rounds, calls=calls)


def parser() -> argparse.ArgumentParser:
    parser = rounds_parser(
        "BatchNorm forward+backward against Equinox, Flax and a proxy."
    )
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_batch_shape,
        metavar="N,C,...",
        help="batch shapes to run instead of the default ones, e.g. 256,64,56,56",
    )
    parser.add_argument(
        "--calls",
        type=positive_int,
        default=1,
        help="calls per sample, waiting once at the end (on a GPU: device time)",
    )
    parser.add_argument(
        "--options",
        action="store_true",
        help=f"only mask, ghost batches of {GHOST}, layout (batch a multiple of "
        f"{GHOST})",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, every one checked before anything compiles: an argparse error
    naming the flag otherwise."""
    p = parser()
    args = p.parse_args(argv)
    refuse_repeats(p, "--shapes", args.shapes or ())
    if args.options:
        for shape in args.shapes or SHAPES:
            if shape[0] % GHOST:
                p.error(
                    f"argument --shapes: with --options the batch size (the first "
                    f"size) must be a multiple of {GHOST}, for ghost batches of "
                    f"{GHOST}; got {','.join(map(str, shape))}"
                )
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = args.shapes
    if args.options:
        print("## Options against plain training, float32\n")
        rows = []
        for shape in shapes:
            times = bench_options(shape, args.rounds, args.calls)
            rows += [
                [
                    str(shape),
                    k,
                    f"{median(v) * 1e3:.2f}",
                    f"{ratio(times, k, 'plain'):.2f}",
                ]
                for k, v in times.items()
            ]
        print(table(rows, ["shape", "option", "ms", "/ plain"]))
        return
    print(
        f"# BatchNorm forward+backward, {jax.default_backend()} "
        f"({platform.processor() or platform.machine()}, {jax.device_count()} "
        f"device(s): {jax.devices()[0].device_kind}), jax {jax.__version__}; "
        f"medians of {args.rounds} interleaved rounds of {args.calls} call(s); "
        "ratios are eqx_norm's time over the peer's in the same round (median over "
        "rounds), or its memory over the peer's.\n"
    )
    rows = []
    for shape in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            times, comp, mem = bench_shape(shape, dtype, args.rounds, args.calls)
            ours = median(times["eqx_norm"])
            rows.append(
                [
                    str(shape),
                    jnp.dtype(dtype).name,
                    f"{ours * 1e3:.2f}",
                    f"{ratio(times, 'eqx_norm', 'flax'):.2f}",
                    f"{ratio(times, 'eqx_norm, channels last', 'flax'):.2f}",
                    f"{ratio(times, 'eqx_norm', 'equinox'):.2f}",
                    f"{ratio(times, 'eqx_norm', 'proxy'):.2f}",
                    f"{mem['eqx_norm'] / max(mem['flax'], 1):.2f}",
                    f"{comp['eqx_norm']:.2f} / {comp['equinox']:.2f}",
                    " / ".join(
                        str(mem[f"{k} kernels"])
                        for k in ("eqx_norm", "equinox", "flax")
                    ),
                ]
            )
            print(
                f"{shape} {jnp.dtype(dtype).name}: "
                + ", ".join(f"{k} {median(v) * 1e3:.2f} ms" for k, v in times.items())
                + "; temp bytes "
                + ", ".join(f"{k} {v}" for k, v in mem.items() if "kernels" not in k),
                flush=True,
            )
    print()
    print(
        table(
            rows,
            [
                "shape",
                "dtype",
                "eqx_norm ms",
                "/ flax",
                "channels last / flax",
                "/ equinox",
                "/ proxy",
                "temp mem / flax",
                "compile s (ours / equinox)",
                "kernels (ours / equinox / flax)",
            ],
        )
    )
    shape = shapes[0] if args.quick or args.shapes else (64, 64, 32, 32)
    print(f"\n## Every approach against `batch`, {shape} float32\n")
    # With the loss above, and with an upstream gradient given as an input (as
    # inside a network): where an approach's forward pass has no batch sums, XLA
    # recomputes the loss's gradient from x instead of reading it, and keeps a
    # full-size copy of it for the backward sums.
    own = bench_approaches(shape, args.rounds, calls=args.calls)
    given = bench_approaches(shape, args.rounds, upstream=True, calls=args.calls)
    print(
        table(
            [
                [
                    k,
                    f"{median(own[k]) * 1e3:.2f}",
                    f"{ratio(own, k, 'batch'):.2f}",
                    f"{median(given[k]) * 1e3:.2f}",
                    f"{ratio(given, k, 'batch'):.2f}",
                ]
                for k in own
            ],
            ["approach", "ms", "/ batch", "ms, upstream grad", "/ batch, upstream"],
        )
    )


if __name__ == "__main__":
    main()
