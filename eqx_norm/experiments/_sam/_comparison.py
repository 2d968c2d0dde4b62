"""The SAM comparison: the experiment's CNN with BatchNorm trained with the base
optimizer and each SAM variant over several seeds (one vmapped ensemble per run),
every test error read from recalibrated statistics, and compared at equal steps and
at equal gradient evaluations (the base run again for as many evaluations as the
method used, with its own schedule). The statistics of the comparison are in
`_sam_summary.py`."""

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ... import APPROACHES, Batch, Tracking, looksam, msam, normalisation_mask, sam
from .. import _training as training
from .._model import CNN
from .._settings import SettingError, check_int, check_names, check_shared, wrap
from .._side_by_side import BATCH_STATISTICS, RECALIBRATED, SideBySide, readings

METHODS = (
    "adam",
    "sam",
    "asam",
    "sam-on",
    "asam-on",
    "looksam",
    "msam",
    "sam-per-micro-batch",
)
"""The methods the comparison knows, in the order it runs and reports them."""

TWO_PASSES = ("sam", "asam", "sam-on", "asam-on", "sam-per-micro-batch")
"""The methods that evaluate the gradient twice per step (per-micro-batch SAM: each
micro-batch twice, one batch's worth each time)."""

SCHEDULES = ("cosine", "constant")
"""The learning-rate schedules: cosine decay to zero over each run's own steps, or
Adam's learning rate throughout."""

RUNNING = "running"
TRACKING = "tracking"
READINGS = {
    RECALIBRATED: "test_error",
    RUNNING: "test_error_running",
    TRACKING: "test_error_tracking",
    BATCH_STATISTICS: "test_error_batch_statistics",
}
"""Each test-error reading and its key in a run: recalibrated (what the verdicts
use), the running statistics as training left them, `approach="tracking"`'s kept
beside them, and the batch statistics of test batches of 1,000."""


@dataclasses.dataclass(frozen=True)
class SAMConfig:
    """The settings of the SAM comparison. The defaults run in about 20 minutes on
    2 CPU cores.

    **Attributes:**

    - `dataset`: `"fashion-mnist"` (default), `"mnist"` or `"digits"`.
    - `methods`: which of `"adam"` (the base optimizer), `"sam"`, `"asam"`,
        `"sam-on"`, `"asam-on"` (SAM and ASAM perturbing the normalisation layers
        only, [`eqx_norm.normalisation_mask`][]), `"looksam"`, `"msam"`
        (Momentum-SAM) and `"sam-per-micro-batch"` to run; the first is the base
        the others are compared with.
    - `approach`: the CNN's BatchNorm approach (`"tracking"`'s statistics are kept
        beside it whatever it is).
    - `seeds`: how many seeds each method runs, as one vmapped ensemble. Every
        method sees the same batches in the same order for a given seed, so
        differences are paired.
    - `steps`: training steps of every method; the base also runs again for as
        many gradient evaluations as each method makes in `steps`.
    - `batch_size`: examples per step.
    - `learning_rate`: Adam's (peak) learning rate, the base optimizer of every
        method.
    - `schedule`: `"cosine"` (decayed to zero over each run's own steps, as SAM
        papers train) or `"constant"`.
    - `rho`: the radius of SAM, LookSAM and per-micro-batch SAM.
    - `asam_rho`: ASAM's radius (ASAM's perturbation is relative to the weights,
        so its radius is larger; the ASAM paper uses about ten times SAM's).
    - `sam_on_rho`, `asam_on_rho`: the radii of SAM-ON and ASAM-ON, larger again,
        as the perturbation acts on few parameters: the SAM-ON authors' code
        defaults to 0.5 and runs ASAM-ON with 10.
    - `msam_rho`: Momentum-SAM's radius (default `msam`'s own, 0.3).
    - `every`, `alpha`: LookSAM's.
    - `micro_batches`: for `"sam-per-micro-batch"`, the number of micro-batches,
        each perturbed by its own gradient.
    - `evaluations`: how many times during each run the test error is read.
    - `recalibration_batches`: the training batches of 64 that the recalibrated
        reading's statistics come from (the same for every method and seed).
    - `data_dir`: a folder of IDX files to read instead of the data set's default.
    """

    dataset: str = "fashion-mnist"
    methods: tuple[str, ...] = METHODS
    approach: str = "batch"
    seeds: int = 5
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    schedule: str = "cosine"
    rho: float = 0.05
    asam_rho: float = 0.5
    sam_on_rho: float = 0.5
    asam_on_rho: float = 10.0
    msam_rho: float = 0.3
    every: int = 5
    alpha: float = 0.1
    micro_batches: int = 4
    evaluations: int = 4
    recalibration_batches: int = training.RECALIBRATION_BATCHES
    data_dir: str | None = None

    def __post_init__(self):
        """Every setting checked before any data is loaded or any step runs: a
        `eqx_norm.experiments.SettingError` (a `ValueError`) names the one that
        cannot run."""
        check_shared(self, self.steps * self.batch_size)
        check_names("methods", self.methods, METHODS)
        if self.approach not in APPROACHES:
            raise SettingError(
                "approach",
                f"is the unknown approach {self.approach!r}; choose from "
                f"{tuple(APPROACHES)}.",
            )
        if self.schedule not in SCHEDULES:
            raise SettingError("schedule", f"must be one of {SCHEDULES}.")
        identity = optax.identity()
        wrap("asam_rho", sam, identity, rho=self.asam_rho, adaptive=True)
        wrap("sam_on_rho", sam, identity, rho=self.sam_on_rho)
        wrap("asam_on_rho", sam, identity, rho=self.asam_on_rho, adaptive=True)
        wrap("msam_rho", msam, identity, rho=self.msam_rho)
        check_int("every", self.every, 1)  # LookSAM's int32 step counter
        wrap("alpha", looksam, identity, alpha=self.alpha)
        check_int("micro_batches", self.micro_batches, 1)
        check_int("recalibration_batches", self.recalibration_batches, 1, 10_000)
        if "sam-per-micro-batch" in self.methods:
            if self.batch_size < 2 * self.micro_batches:
                raise SettingError(
                    "batch_size",
                    "must be at least twice `micro_batches`, for a batch variance "
                    "in every micro-batch.",
                )
            if self.batch_size % self.micro_batches:
                raise SettingError(
                    "batch_size",
                    f"({self.batch_size}) must be a multiple of `micro_batches` "
                    f"({self.micro_batches}).",
                )
        chunks = self.steps // training.chunk_size(self.steps)
        check_int("evaluations", self.evaluations, 1)
        if self.evaluations > chunks:
            raise SettingError(
                "evaluations",
                f"must be at most {chunks} for {self.steps} steps: the test error "
                "is read between chunks of "
                f"{training.chunk_size(self.steps)} steps, "
                f"got {self.evaluations}.",
            )
        longest = max(base_lengths(self).values())
        if self.seeds * longest * self.batch_size > 2**31 - 1:
            raise SettingError(
                "steps",
                f"({self.steps}) needs a base run of {longest} steps to match the "
                f"gradient evaluations of the costliest method, and {longest} times "
                f"`batch_size` ({self.batch_size}) times `seeds` ({self.seeds}) is "
                "more examples than int32 can plan.",
            )


def gradient_evaluations(method: str, steps: int, every: int) -> int:
    """How many gradients of one batch `method` evaluates in `steps` steps: 2 per
    step for SAM, ASAM, SAM-ON, ASAM-ON and per-micro-batch SAM, 1 plus one in
    `every` for LookSAM (on steps 0, `every`, ...), 1 for Adam and Momentum-SAM."""
    if method in TWO_PASSES:
        return 2 * steps
    if method == "looksam":
        return steps + -(-steps // every)
    return steps


def base_lengths(config: SAMConfig) -> dict[str, int]:
    """For each method, the steps of the base run with at least as many gradient
    evaluations as the method makes in `config.steps` (rounded up to a whole chunk
    of the run's own length): the base is compared with at least the method's
    compute, never less."""
    base = config.methods[0]
    out = {}
    for method in config.methods:
        evaluations = gradient_evaluations(method, config.steps, config.every)
        steps = config.steps
        while gradient_evaluations(base, steps, config.every) < evaluations:
            steps += 1
        chunk = training.chunk_size(config.steps)
        out[method] = chunk * -(-steps // chunk)
    return out


def evaluation_steps(steps: int, evaluations: int) -> list[int]:
    """After which steps the test error is read: `evaluations` ends of chunks,
    spread evenly, the last at `steps`."""
    chunk = training.chunk_size(steps)
    return sorted(
        {
            chunk * -(-round(steps * (k + 1) / evaluations) // chunk)
            for k in range(evaluations)
        }
    )


@dataclasses.dataclass
class SAMResults:
    """What the SAM comparison measured.

    **Attributes:**

    - `config`: the [`eqx_norm.experiments.SAMConfig`][] that ran.
    - `runs`: for each method, and for each longer run of the base
        (`"adam @ 3000 steps"`), a dict of NumPy arrays: `loss` (per seed and
        step), `eval_steps` (the steps after which the test error was read),
        `gradient_evaluations` (the gradients of one batch evaluated by then), the
        test error per evaluation and seed read four ways (`test_error`:
        recalibrated, what the verdicts use; `test_error_running`: the running
        statistics as training left them; `test_error_tracking`:
        `approach="tracking"`'s, kept beside them; `test_error_batch_statistics`:
        training mode on test batches of 1,000), `train_seconds` (per evaluation:
        the ensemble's training time so far, compilation excluded) and
        `seconds_per_step` (the median over its chunks of the ensemble's time per
        step).
    - `versions`: the versions of Python, JAX, Equinox, Optax and eqx_norm.
    - `seconds`: the wall time of the whole comparison.
    """

    config: SAMConfig
    runs: dict[str, dict[str, np.ndarray]]
    versions: dict[str, str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything, arrays as nested lists, with the
        summary."""
        from ._summary import summary

        return {
            "config": dataclasses.asdict(self.config),
            "versions": self.versions,
            "seconds": self.seconds,
            "summary": summary(self).to_json(),
            "runs": {
                name: {k: np.asarray(v).tolist() for k, v in run.items()}
                for name, run in self.runs.items()
            },
        }


def continued(base: str, steps: int) -> str:
    """The name of a longer run of the base."""
    return f"{base} @ {steps} steps"


def _optimizer(method: str, config: SAMConfig, steps: int) -> Any:
    """The method around Adam, with the learning-rate schedule over `steps`."""
    rate = (
        optax.cosine_decay_schedule(config.learning_rate, steps)
        if config.schedule == "cosine"
        else config.learning_rate
    )
    adam = optax.adam(rate)
    on = normalisation_mask
    return {
        "adam": lambda: adam,
        "sam": lambda: sam(adam, rho=config.rho),
        "sam-per-micro-batch": lambda: sam(adam, rho=config.rho),
        "asam": lambda: sam(adam, rho=config.asam_rho, adaptive=True),
        "sam-on": lambda: sam(adam, rho=config.sam_on_rho, mask=on),
        "asam-on": lambda: sam(adam, rho=config.asam_on_rho, adaptive=True, mask=on),
        "looksam": lambda: looksam(
            adam, rho=config.rho, every=config.every, alpha=config.alpha
        ),
        "msam": lambda: msam(adam, rho=config.msam_rho),
    }[method]()


def _approach(config: SAMConfig) -> SideBySide:
    """The CNN's approach with `tracking`'s statistics kept beside its own."""
    own = Batch() if config.approach == "batch" else APPROACHES[config.approach]()
    return SideBySide(((RUNNING, own, 0.99), (TRACKING, Tracking(), 0.99)))


def _train(
    method: str,
    steps: int,
    config: SAMConfig,
    data,
    indices: np.ndarray,
    recalibration: list[jax.Array],
    on_steps: Callable[[int], object],
    evaluate_at: list[int],
) -> dict[str, np.ndarray]:
    """One method (or a run of the base) for `steps` steps, every seed at once."""
    train, test = data
    options = (
        {"micro_batches": config.micro_batches, "perturbation": "per-micro-batch"}
        if method == "sam-per-micro-batch"
        else {}
    )
    optimizer, step = training.training_step(
        _optimizer(method, config, steps), **options
    )
    step = training.ensemble_step(step)
    approach = _approach(config)

    def make(key):
        model, state = eqx.nn.make_with_state(CNN)(approach, key=key)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        return model, state, opt_state

    keys = jnp.stack([jax.random.key(s) for s in range(config.seeds)])
    ensemble = training.lockstep(eqx.filter_vmap(make)(keys))
    chunk = training.chunk_size(config.steps)
    # Compile before the clock starts, for every method alike.
    jax.block_until_ready(training.train_chunk(step, ensemble, indices[:chunk], *train))
    losses, times, evaluated = [], [], []
    errors: dict[str, list[np.ndarray]] = {key: [] for key in READINGS.values()}
    for t in range(0, steps, chunk):
        begin = time.perf_counter()
        ensemble, metrics = training.train_chunk(
            step, ensemble, indices[t : t + chunk], *train
        )
        losses.append(np.asarray(metrics["loss"]))  # waits for the chunk
        times.append(time.perf_counter() - begin)
        if t + chunk in evaluate_at:
            for key, values in _errors(ensemble, config, test, recalibration).items():
                errors[key].append(values)
            evaluated.append(len(times))
        on_steps(chunk)
    elapsed = np.cumsum(times)
    at = np.asarray(evaluated)
    return {
        "loss": np.concatenate(losses).T,
        "eval_steps": at * chunk,
        "gradient_evaluations": np.asarray(
            [gradient_evaluations(method, int(s), config.every) for s in at * chunk]
        ),
        **{key: np.stack(values) for key, values in errors.items()},
        "train_seconds": elapsed[at - 1],
        "seconds_per_step": np.asarray(np.median(times) / chunk),
    }


def _errors(ensemble, config: SAMConfig, test, recalibration) -> dict[str, Any]:
    """Each seed's test error read the four ways (`READINGS`)."""
    models, states, _ = ensemble
    per_seed: dict[str, list[float]] = {key: [] for key in READINGS.values()}

    def accuracy(model, state, inference):
        one = jax.tree.map(lambda a: a[None] if eqx.is_array(a) else a, (model, state))
        return float(training.accuracy(one, *test, inference=inference)[0])

    for i in range(config.seeds):
        model, state = jax.tree.map(
            lambda a: a[i] if eqx.is_array(a) else a, (models, states)
        )
        read = readings(model, state, recalibration, [RUNNING, TRACKING], accuracy)
        for reading, key in READINGS.items():
            per_seed[key].append(1 - read[reading])
    return {key: np.asarray(values) for key, values in per_seed.items()}


def run_sam_comparison(
    config: SAMConfig = SAMConfig(), *, progress: bool = True
) -> SAMResults:
    """Train the experiment's CNN (with BatchNorm) with each method, every seed as
    one vmapped ensemble; run the base (the first method) again for as many
    gradient evaluations as each method makes; read every test error from
    recalibrated statistics (and the running and `tracking` ones beside them).

    **Arguments:**

    - `config`: an [`eqx_norm.experiments.SAMConfig`][].
    - `progress`: show a progress bar (needs `tqdm`, in the `experiment` extra).

    **Returns:**

    The [`eqx_norm.experiments.SAMResults`][].
    """
    start = time.perf_counter()
    # Every optimizer first, so that a bad hyperparameter fails before any training.
    for method in config.methods:
        _optimizer(method, config, config.steps)
    data = training.load_splits(config.dataset, config.data_dir)
    recalibration = training.recalibration_batches(
        data[0][0], config.recalibration_batches
    )
    base = config.methods[0]
    lengths = base_lengths(config)
    plan = [(m, m, config.steps) for m in config.methods]
    for steps in sorted(set(lengths.values()) - {config.steps}):
        plan.append((continued(base, steps), base, steps))
    longest = max(steps for _, _, steps in plan)
    order = _batch_order(len(data[0][0]), config, longest)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(steps for _, _, steps in plan)
        bar = tqdm(total=total, unit="step", desc="sam comparison")
    runs = {}
    for name, method, steps in plan:
        if bar is not None:
            bar.set_postfix_str(name)
        at = evaluation_steps(
            steps, config.evaluations if name in config.methods else 1
        )
        runs[name] = _train(
            method,
            steps,
            config,
            data,
            order,
            recalibration,
            bar.update if bar else lambda n: None,
            at,
        )
    if bar is not None:
        bar.close()
    return SAMResults(config, runs, training.versions(), time.perf_counter() - start)


def _batch_order(n: int, config: SAMConfig, steps: int) -> np.ndarray:
    """Shuffled epochs, one order per seed, the same for every run (a shorter run
    takes its first steps): shape (steps, seeds, batch_size)."""
    out = np.empty((config.seeds, steps * config.batch_size), np.int32)
    for s in range(config.seeds):
        rng = np.random.default_rng(s)
        epochs = math.ceil(steps * config.batch_size / n)
        order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
        out[s] = order[: steps * config.batch_size]
    return out.reshape(config.seeds, steps, config.batch_size).transpose(1, 0, 2)
