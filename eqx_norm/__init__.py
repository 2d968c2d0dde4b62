"""BatchNorm with a choice of statistics strategies, and SAM/ASAM, for JAX and
Equinox."""

import importlib.metadata

from ._io._checkpoint import load as load, save as save
from ._io._sharding import replicate as replicate, shard_batch as shard_batch
from ._nn._approach import (
    AbstractApproach as AbstractApproach,
    AbstractStoredApproach as AbstractStoredApproach,
    Approach as Approach,
    BatchStats as BatchStats,
    RunningStats as RunningStats,
)
from ._nn._approaches import (
    APPROACHES as APPROACHES,
    EMA as EMA,
    AdamCorrection as AdamCorrection,
    Batch as Batch,
    Frozen as Frozen,
    Renorm as Renorm,
    Running as Running,
    SmoothStart as SmoothStart,
)
from ._nn._batch_norm import BatchNorm as BatchNorm
from ._nn._channel_affine import ChannelAffine as ChannelAffine
from ._nn._tracking import Tracking as Tracking, TrackingStats as TrackingStats
from ._sam._contract import (
    AbstractStepGradient as AbstractStepGradient,
    NextPerturbation as NextPerturbation,
    Perturbation as Perturbation,
    pass_point as pass_point,
    perturbed_gradient as perturbed_gradient,
)
from ._sam._looksam import LookSAMState as LookSAMState, looksam as looksam
from ._sam._msam import MSAMState as MSAMState, msam as msam
from ._sam._sam import SAMState as SAMState, sam as sam
from ._sam._step import sam_step as sam_step
from ._tools._diagnose import (
    Diagnosis as Diagnosis,
    LayerDiagnosis as LayerDiagnosis,
    diagnose as diagnose,
)
from ._tools._fold import fold as fold, fold_into as fold_into
from ._tools._from_equinox import from_equinox as from_equinox
from ._tools._masks import normalisation_mask as normalisation_mask
from ._tools._recalibrate import recalibrate as recalibrate
from ._tools._walk import (
    batch_norms as batch_norms,
    freeze as freeze,
    match_state as match_state,
    set_approach as set_approach,
    set_compute_channels_last as set_compute_channels_last,
)

try:
    __version__ = importlib.metadata.version("eqx_norm")
except importlib.metadata.PackageNotFoundError:  # a source tree, not installed
    __version__ = "unknown"

__all__ = [
    "APPROACHES",
    "AbstractApproach",
    "AbstractStoredApproach",
    "AdamCorrection",
    "Approach",
    "Batch",
    "BatchNorm",
    "BatchStats",
    "ChannelAffine",
    "Diagnosis",
    "EMA",
    "Frozen",
    "LayerDiagnosis",
    "LookSAMState",
    "MSAMState",
    "NextPerturbation",
    "Perturbation",
    "Renorm",
    "Running",
    "RunningStats",
    "SAMState",
    "SmoothStart",
    "AbstractStepGradient",
    "Tracking",
    "TrackingStats",
    "batch_norms",
    "diagnose",
    "fold",
    "fold_into",
    "freeze",
    "from_equinox",
    "load",
    "looksam",
    "match_state",
    "msam",
    "normalisation_mask",
    "pass_point",
    "perturbed_gradient",
    "recalibrate",
    "replicate",
    "sam",
    "sam_step",
    "save",
    "set_approach",
    "set_compute_channels_last",
    "shard_batch",
]
