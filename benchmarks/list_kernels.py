"""The kernels of each candidate's compiled forward+backward, as `bench_batch_norm.py`
builds them: one line per top-level instruction of the compiled program (other than
parameters, constants, tuples and bitcasts), with its output shape and what it
computes, for comparing where two layers spend their launches.

    python benchmarks/list_kernels.py [--shape 64,512] [--dtype float32] [--hlo DIR]
"""

import argparse
import re

import bench_batch_norm as bench
import jax
from _timing import kernel_lines, parse_batch_shape, writable_folder


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The kernels of each candidate's compiled forward+backward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--shape",
        type=parse_batch_shape,
        default=(64, 512),
        metavar="N,C,...",
        help="the batch shape, e.g. 64,512 or 256,64,56,56",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the batch's dtype",
    )
    parser.add_argument(
        "--hlo",
        metavar="DIR",
        type=writable_folder,
        help="an existing folder to write each compiled program into",
    )
    return parser


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    shape = args.shape
    x = jax.random.normal(jax.random.key(0), shape).astype(args.dtype)
    builders = {
        "eqx_norm": lambda: bench.eqx_norm_step(x),
        "equinox": lambda: bench.equinox_step(x),
        "flax": lambda: bench.flax_step(x),
    }
    device = jax.devices()[0].device_kind
    print(f"{device}, jax {jax.__version__}, {shape} {args.dtype}")
    for name, build in builders.items():
        fn, fn_args = build()
        compiled = fn.lower(*fn_args).compile()
        lines = kernel_lines(compiled)
        if args.hlo:
            name_of_file = f"{name}-{'x'.join(map(str, shape))}-{args.dtype}.txt"
            with open(f"{args.hlo}/{name_of_file}", "w") as f:
                f.write(compiled.as_text())
        print(f"\n## {name}: {len(lines)} kernels")
        for line in lines:
            # `%name = shape kind(...)`, without the operands and metadata.
            head = re.sub(r"\(.*", "", line.split(" = ", 1)[1])
            op = re.search(r'op_name="([^"]*)"', line)
            where = op.group(1).rsplit("/", 2)[-2:] if op else []
            print(f"  {line.split(' = ')[0]:<36} {head:<32} {'/'.join(where)}")


if __name__ == "__main__":
    main()
