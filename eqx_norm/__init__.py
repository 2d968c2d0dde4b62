"""BatchNorm with a choice of statistics strategies, and SAM/ASAM, for JAX and
Equinox."""

import importlib.metadata

from ._approaches import (
    EMA as EMA,
    AdamCorrection as AdamCorrection,
    Approach as Approach,
    Batch as Batch,
    BatchStats as BatchStats,
    Frozen as Frozen,
    Renorm as Renorm,
    Running as Running,
    RunningStats as RunningStats,
    SmoothStart as SmoothStart,
)
from ._batch_norm import BatchNorm as BatchNorm
from ._sam import SAMState as SAMState, sam as sam
from ._step import sam_step as sam_step

__version__ = importlib.metadata.version("eqx_norm")

__all__ = [
    "AdamCorrection",
    "Approach",
    "Batch",
    "BatchNorm",
    "BatchStats",
    "EMA",
    "Frozen",
    "Renorm",
    "Running",
    "RunningStats",
    "SAMState",
    "SmoothStart",
    "sam",
    "sam_step",
]
