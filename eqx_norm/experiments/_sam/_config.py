"""The SAM comparison's settings and its bookkeeping: the methods, the readings,
`SAMConfig`, and how many steps and gradient evaluations each run takes."""

import dataclasses

import optax

from ... import APPROACHES, looksam, msam, sam
from .. import _training as training
from .._settings import SettingError, check_int, check_names, check_shared, wrap
from .._side_by_side import BATCH_STATISTICS, RECALIBRATED

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


def continued(base: str, steps: int) -> str:
    """The name of a longer run of the base."""
    return f"{base} @ {steps} steps"
