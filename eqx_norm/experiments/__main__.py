"""`python -m eqx_norm.experiments`: run the instability experiment from the shell."""

import argparse
import sys

from .._approaches import APPROACHES
from ..data import DATASETS
from ._report import claims_table, save_results
from ._run import DEFAULT_APPROACHES, Config, run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eqx_norm.experiments",
        description="Train the small MNIST CNN with each BatchNorm approach (and "
        "optionally SAM) over several seeds; plot gradient norms, losses and "
        "BatchNorm output statistics; check the claims of the Equinox "
        "BatchNorm-instability report.",
    )
    d = Config()
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="digits: 5,000 real MNIST digits shipped with the package "
        "(default); mnist: the full MNIST (see --data-dir, --download); "
        "fashion-mnist: from Debian's dataset-fashion-mnist or --data-dir",
    )
    p.add_argument(
        "--approaches",
        nargs="+",
        default=list(DEFAULT_APPROACHES),
        choices=("none",) + tuple(APPROACHES),
        metavar="APPROACH",
        help="approaches to compare, 'none' for no BatchNorm (default: "
        f"{' '.join(DEFAULT_APPROACHES)}); any of: none "
        f"{' '.join(APPROACHES)}",
    )
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument(
        "--sam",
        action="store_true",
        help="also run every approach with SAM around Adam",
    )
    p.add_argument("--asam", action="store_true", help="with --sam: use ASAM")
    p.add_argument("--rho", type=float, default=d.rho, help="SAM's radius")
    p.add_argument(
        "--data-dir",
        default=None,
        help="a folder of {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="with --dataset mnist: download missing files (checksummed)",
    )
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = Config(
            dataset=args.dataset,
            approaches=tuple(args.approaches),
            momentum=args.momentum,
            seeds=args.seeds,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            sam=args.sam,
            rho=args.rho,
            adaptive=args.asam,
            data_dir=args.data_dir,
            download=args.download,
        )
        results = run(config, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = save_results(results, args.out)
    print(claims_table(results))
    print(
        f"\n{results.seconds:.1f} s in all; wrote "
        + ", ".join(str(p) for p in paths.values())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
