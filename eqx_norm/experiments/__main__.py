"""`python -m eqx_norm.experiments`: run the instability experiment from the shell;
`python -m eqx_norm.experiments sam`: the SAM comparison."""

import argparse
import sys

from .._approaches import APPROACHES
from ..data import DATASETS
from ._report import claims_table, save_results
from ._run import DEFAULT_APPROACHES, Config, run
from ._sam_comparison import (
    METHODS,
    SAMConfig,
    run_sam_comparison,
    sam_table,
    save_sam_results,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eqx_norm.experiments",
        description="Train the small MNIST CNN with each BatchNorm approach (and "
        "optionally SAM) over several seeds; plot gradient norms, losses and "
        "BatchNorm output statistics; check the claims of the Equinox "
        "BatchNorm-instability report. `python -m eqx_norm.experiments sam "
        "--help`: the SAM comparison.",
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


def _sam_parser() -> argparse.ArgumentParser:
    d = SAMConfig()
    p = argparse.ArgumentParser(
        prog="python -m eqx_norm.experiments sam",
        description="Train the experiment's CNN with BatchNorm with the base "
        "optimizer (Adam), SAM, ASAM, LookSAM and SAM with per-micro-batch "
        "perturbation, over several seeds; report test error (mean and spread over "
        "seeds), training loss and time per step relative to the base, as a table, "
        "a plot of test error against wall time, and results.json. The defaults "
        "(full Fashion-MNIST, 3 seeds, 2,000 steps) run in about 10 minutes on 2 "
        "CPU cores, under 15.",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="fashion-mnist (default): from Debian's dataset-fashion-mnist or "
        "--data-dir; mnist: the full MNIST (--data-dir or the download cache); "
        "digits: the 5,000 digits shipped with the package",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(d.methods),
        choices=METHODS,
        metavar="METHOD",
        help="methods to compare, the first is the base (default: "
        f"{' '.join(METHODS)})",
    )
    p.add_argument("--approach", default=d.approach, help="the BatchNorm approach")
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--rho", type=float, default=d.rho, help="SAM's radius")
    p.add_argument("--asam-rho", type=float, default=d.asam_rho, help="ASAM's radius")
    p.add_argument("--every", type=int, default=d.every, help="LookSAM's period")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LookSAM's alpha")
    p.add_argument(
        "--micro-batches",
        type=int,
        default=d.micro_batches,
        help="for sam-per-micro-batch: micro-batches, each perturbed by its own "
        "gradient",
    )
    p.add_argument(
        "--evaluations",
        type=int,
        default=d.evaluations,
        help="how many times the test error is measured during training",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="a folder of {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    )
    p.add_argument(
        "--out", default="results/sam", help="output folder (default: results/sam)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run_and_report(run_it, save, table, out: str) -> int:
    """Run an experiment, save its outputs in `out` and print its table; a bad
    setting or a missing file is one line on stderr and exit status 2."""
    try:
        results = run_it()
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = save(results, out)
    print(table(results))
    print(
        f"\n{results.seconds:.1f} s in all; wrote "
        + ", ".join(str(p) for p in paths.values())
    )
    return 0


def _main_sam(argv: list[str]) -> int:
    args = _sam_parser().parse_args(argv)

    def run_it():
        config = SAMConfig(
            dataset=args.dataset,
            methods=tuple(args.methods),
            approach=args.approach,
            seeds=args.seeds,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            rho=args.rho,
            asam_rho=args.asam_rho,
            every=args.every,
            alpha=args.alpha,
            micro_batches=args.micro_batches,
            evaluations=args.evaluations,
            data_dir=args.data_dir,
        )
        return run_sam_comparison(config, progress=not args.no_progress)

    return _run_and_report(run_it, save_sam_results, sam_table, args.out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sam"]:
        return _main_sam(argv[1:])
    args = _parser().parse_args(argv)

    def run_it():
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
        return run(config, progress=not args.no_progress)

    return _run_and_report(run_it, save_results, claims_table, args.out)


if __name__ == "__main__":
    sys.exit(main())
