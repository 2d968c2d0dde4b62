"""`python -m eqx_norm.experiments`: run the instability experiment from the shell;
`python -m eqx_norm.experiments sam`: the SAM comparison;
`python -m eqx_norm.experiments lag`: the lag of running statistics.

Every value is checked, and the output folder found writable, before any data is
loaded or any step runs; a value that cannot run is an argparse error that names
its flag (exit status 2)."""

import argparse
import dataclasses
import sys
from collections.abc import Callable, Iterable
from typing import Any

from .. import APPROACHES
from ..data import DATASETS
from ._instability._report import claims_table, save_results
from ._instability._run import DEFAULT_APPROACHES, KNOWN_APPROACHES, Config, run
from ._lag._config import REGIMES, LagConfig
from ._lag._report import lag_table, save_lag_results
from ._lag._run import run_lag
from ._sam._comparison import run_sam_comparison
from ._sam._config import METHODS, SCHEDULES, SAMConfig
from ._sam._summary import sam_table, save_sam_results
from ._settings import (
    SettingError,
    check_data_folder,
    check_installed,
    check_output_folder,
)

# The files each command writes into --out.
_FILES = ("instability.png", "results.json", "claims.txt")
_SAM_FILES = ("sam.png", "results.json", "table.txt")
_LAG_FILES = ("lag.png", "results.json", "table.txt")
# Settings whose flag is not `--` and the setting's name with dashes.
_FLAGS = {"adaptive": "--asam"}


def _flag(setting: str) -> str:
    return _FLAGS.get(setting, "--" + setting.replace("_", "-"))


def _add_values(
    p: argparse.ArgumentParser, d: Config | SAMConfig | LagConfig, flags: dict[str, str]
) -> None:
    """Flags of one number each, from flag to help; type and default from `d`."""
    for flag, help in flags.items():
        default = getattr(d, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=type(default), default=default, help=help)


def _add_shared(p: argparse.ArgumentParser, d: Config | SAMConfig, out: str) -> None:
    """The flags both commands have, with the defaults of `d`."""
    shared = {
        "--seeds": "seeds per run",
        "--steps": "training steps",
        "--batch-size": "examples per step",
        "--learning-rate": "Adam's learning rate, above 0",
        "--rho": "SAM's radius, at least 0",
    }
    _add_values(p, d, shared)
    p.add_argument(
        "--data-dir",
        default=None,
        help="a folder of {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
        "(default: the data set's own folder%(default).0s)",
    )
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eqx_norm.experiments",
        description="Train the small MNIST CNN with each BatchNorm approach (and "
        "optionally SAM) over several seeds; plot gradient norms, losses and "
        "BatchNorm output statistics; check the claims of the Equinox "
        "BatchNorm-instability report. `python -m eqx_norm.experiments sam "
        "--help`: the SAM comparison.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = Config()
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="digits: 5,000 real MNIST digits shipped with the package; mnist: the "
        "full MNIST (see --data-dir, --download); fashion-mnist: from Debian's "
        "dataset-fashion-mnist or --data-dir",
    )
    p.add_argument(
        "--approaches",
        nargs="+",
        default=list(DEFAULT_APPROACHES),
        choices=KNOWN_APPROACHES,
        metavar="APPROACH",
        help="approaches to compare, each once, 'none' for no BatchNorm; any of: "
        f"{' '.join(KNOWN_APPROACHES)}",
    )
    _add_values(
        p,
        d,
        {"--momentum": "BatchNorm momentum (the weight of the old value), in [0, 1)"},
    )
    _add_shared(p, d, "results")
    p.add_argument(
        "--sam", action="store_true", help="also run every approach with SAM"
    )
    p.add_argument(
        "--asam", dest="adaptive", action="store_true", help="with --sam: use ASAM"
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="with --dataset mnist: download missing files (checksummed)",
    )
    return p


def _sam_parser() -> argparse.ArgumentParser:
    d = SAMConfig()
    p = argparse.ArgumentParser(
        prog="python -m eqx_norm.experiments sam",
        description="Train the experiment's CNN with BatchNorm with the base "
        "optimizer (Adam), SAM, ASAM, SAM-ON and ASAM-ON (normalisation layers "
        "only), LookSAM, Momentum-SAM and SAM with per-micro-batch perturbation, "
        "every seed as one vmapped ensemble with the same batches for every "
        "method. The base runs again for as many gradient evaluations as each "
        "method makes, with its own schedule, so every method is compared with it "
        "at equal steps and at equal gradient evaluations: paired differences in "
        "test error read with statistics recalibrated at the final weights "
        "(the running and approach='tracking' readings beside), with a 95% "
        "interval over seeds (Student's t): 'better' only where it excludes zero, "
        "else 'no difference larger than' its far end. Writes a table, a plot of "
        "test error against gradient evaluations and wall time, and results.json. "
        "The defaults (full Fashion-MNIST, all methods, 5 seeds, 1,500 steps, "
        "cosine schedule) run in about 20 minutes on 2 CPU cores. With fewer than "
        "3 seeds there is no verdict.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="fashion-mnist: from Debian's dataset-fashion-mnist or --data-dir; "
        "mnist: the full MNIST (--data-dir or the download cache); digits: the "
        "5,000 digits shipped with the package",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(d.methods),
        choices=METHODS,
        metavar="METHOD",
        help=f"methods to compare, each once, the first is the base; any of: "
        f"{' '.join(METHODS)}",
    )
    p.add_argument(
        "--approach",
        default=d.approach,
        choices=tuple(APPROACHES),
        metavar="APPROACH",
        help=f"the BatchNorm approach, one of: {' '.join(APPROACHES)}",
    )
    _add_shared(p, d, "results/sam")
    sam_flags = {
        "--asam-rho": "ASAM's radius, at least 0",
        "--sam-on-rho": "SAM-ON's radius (normalisation layers only), at least 0",
        "--asam-on-rho": "ASAM-ON's radius, at least 0",
        "--msam-rho": "Momentum-SAM's radius, at least 0",
        "--every": "LookSAM's period, from 1 to 2**31-1",
        "--alpha": "LookSAM's alpha, at least 0",
        "--micro-batches": "for sam-per-micro-batch: micro-batches, each perturbed "
        "by its own gradient; --batch-size must be a multiple, at least twice as "
        "large",
        "--evaluations": "how many times the test error is measured during "
        "training, at most once per chunk of up to 10 steps",
        "--recalibration-batches": "training batches of 64 the recalibrated "
        "statistics come from",
    }
    _add_values(p, d, sam_flags)
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="cosine: Adam's learning rate decayed to 0 over each run's own steps, "
        "as SAM papers train; constant: Adam's rate throughout",
    )
    return p


def _lag_parser() -> argparse.ArgumentParser:
    d = LagConfig()
    p = argparse.ArgumentParser(
        prog="python -m eqx_norm.experiments lag",
        description="How far inference with running statistics falls behind the "
        "model it evaluates. Trains a residual CNN and an MLP with BatchNorm in "
        "four regimes (weights that move fast or settle, large or small batches) "
        "and reads the test accuracy during training with the batch's own "
        "statistics, with approach='batch''s running statistics at each momentum, "
        "with approach='tracking''s and after eqx_norm.recalibrate. Every reading "
        "comes from the same training run (all of them train as 'batch' does). "
        "Writes a table, a figure of test accuracy over the steps and "
        "results.json. The defaults (full Fashion-MNIST, or the bundled digits "
        "where it is not installed; 2 seeds) run in about 6 minutes on 2 CPU "
        "cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="fashion-mnist: from Debian's dataset-fashion-mnist or --data-dir "
        "(the bundled digits when neither has it); mnist: --data-dir or the "
        "download cache; digits: the 5,000 digits shipped with the package",
    )
    p.add_argument(
        "--regimes",
        nargs="+",
        default=list(d.regimes),
        choices=tuple(REGIMES),
        metavar="REGIME",
        help="regimes to run, each once; any of: "
        + "; ".join(f"{k} ({r.about})" for k, r in REGIMES.items()),
    )
    _add_values(
        p,
        d,
        {
            "--seeds": "seeds per regime",
            "--learning-rate": "Adam's (peak) learning rate, above 0",
            "--evaluations": "test accuracy readings per run",
            "--recalibration-batches": "training batches of 64 that recalibrate reads",
        },
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of every regime instead of its own (default: each "
        "regime's%(default).0s)",
    )
    p.add_argument(
        "--momenta",
        nargs="+",
        type=float,
        default=list(d.momenta),
        metavar="MOMENTUM",
        help="momenta of approach='batch' whose running statistics are read, each "
        "in [0, 1)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="a folder of {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
        "(default: the data set's own folder%(default).0s)",
    )
    p.add_argument("--out", default="results/lag", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _config(config_type: type, args: argparse.Namespace) -> Any:
    """The configuration from the parsed flags (each named after its field)."""
    values = {}
    for field in dataclasses.fields(config_type):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_type(**values)


def _main(
    parser: argparse.ArgumentParser,
    config_type: type,
    run_it: Callable[..., Any],
    save: Callable[[Any, str], dict],
    table: Callable[[Any], str],
    files: Iterable[str],
    argv: list[str],
) -> int:
    """Parse and check every flag (an argparse error naming the flag), then run,
    save the outputs in --out and print the table."""
    args = parser.parse_args(argv)
    try:
        config = _config(config_type, args)
        check_output_folder(args.out, files)
        if not getattr(config, "falls_back", False):
            check_data_folder(
                config.dataset, config.data_dir, getattr(config, "download", False)
            )
    except SettingError as e:
        parser.error(f"argument {_flag(e.setting)}: {e.problem}")
    try:
        check_installed("matplotlib", "for the plots")
        if not args.no_progress:
            check_installed("tqdm", "for the progress bar (or pass --no-progress)")
    except ImportError as e:
        parser.error(str(e))
    try:
        results = run_it(config, progress=not args.no_progress)
    except SettingError as e:
        parser.error(f"argument {_flag(e.setting)}: {e.problem}")
    except (ValueError, OSError) as e:  # an invalid data file, a failed download
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        paths = save(results, args.out)
    except OSError as e:
        print(f"error: writing the results to {args.out!r}: {e}", file=sys.stderr)
        return 2
    print(table(results))
    print(
        f"\n{results.seconds:.1f} s in all; wrote "
        + ", ".join(str(p) for p in paths.values())
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lag"]:
        return _main(
            _lag_parser(),
            LagConfig,
            run_lag,
            save_lag_results,
            lag_table,
            _LAG_FILES,
            argv[1:],
        )
    if argv[:1] == ["sam"]:
        return _main(
            _sam_parser(),
            SAMConfig,
            run_sam_comparison,
            save_sam_results,
            sam_table,
            _SAM_FILES,
            argv[1:],
        )
    return _main(_parser(), Config, run, save_results, claims_table, _FILES, argv)


if __name__ == "__main__":
    sys.exit(main())
