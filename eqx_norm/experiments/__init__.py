"""The MNIST CNN instability experiment: every BatchNorm approach (and SAM), several
seeds, step-by-step gradient norms, losses and BatchNorm output statistics, plots
and the claims of the Equinox BatchNorm-instability report checked on real digits.

```python
from eqx_norm import experiments

results = experiments.run(experiments.Config(steps=100, seeds=3))
print(experiments.claims_table(results))
experiments.save_results(results, "results")
```

From the shell: `python -m eqx_norm.experiments --help`.

The SAM comparison (base optimizer, SAM, ASAM, SAM-ON, ASAM-ON, LookSAM,
Momentum-SAM, per-micro-batch SAM, at equal steps and equal gradient evaluations):

```python
results = experiments.run_sam_comparison(experiments.SAMConfig(steps=100))
print(experiments.sam_table(results))
experiments.save_sam_results(results, "results/sam")
```

Every setting is checked when its configuration is made: a setting that cannot
run raises `experiments.SettingError` (a `ValueError`) naming it, before any data
is loaded or any step runs.

From the shell: `python -m eqx_norm.experiments sam --help`.

The lag experiment (test accuracy read with batch statistics, with running
statistics at several momenta and with `approach="tracking"`, and recalibrated, in
four regimes):

```python
results = experiments.run_lag(experiments.LagConfig(seeds=2))
print(experiments.lag_table(results))
experiments.save_lag_results(results, "results/lag")
```

From the shell: `python -m eqx_norm.experiments lag --help`.
"""

from ._instability._report import (
    claims as claims,
    claims_table as claims_table,
    plot as plot,
    save_results as save_results,
)
from ._instability._run import (
    DEFAULT_APPROACHES as DEFAULT_APPROACHES,
    Config as Config,
    Results as Results,
    run as run,
    run_label as run_label,
)
from ._lag._config import (
    REGIMES as REGIMES,
    LagConfig as LagConfig,
    LagResults as LagResults,
    Regime as Regime,
)
from ._lag._report import (
    lag_summary as lag_summary,
    lag_table as lag_table,
    plot_lag as plot_lag,
    save_lag_results as save_lag_results,
)
from ._lag._run import run_lag as run_lag
from ._model import CNN as CNN, loss_fn as loss_fn
from ._sam._comparison import run_sam_comparison as run_sam_comparison
from ._sam._config import SAMConfig as SAMConfig
from ._sam._summary import (
    Comparison as Comparison,
    Difference as Difference,
    MethodRow as MethodRow,
    SAMResults as SAMResults,
    SAMSummary as SAMSummary,
    plot_sam as plot_sam,
    sam_table as sam_table,
    save_sam_results as save_sam_results,
    summary as sam_summary,
)
from ._settings import (
    DataNotFoundError as DataNotFoundError,
    SettingError as SettingError,
)

__all__ = [
    "CNN",
    "Comparison",
    "Difference",
    "Config",
    "DataNotFoundError",
    "DEFAULT_APPROACHES",
    "LagConfig",
    "LagResults",
    "MethodRow",
    "REGIMES",
    "Regime",
    "Results",
    "SAMConfig",
    "SAMResults",
    "SAMSummary",
    "SettingError",
    "claims",
    "claims_table",
    "lag_summary",
    "lag_table",
    "loss_fn",
    "plot",
    "run",
    "plot_lag",
    "plot_sam",
    "run_label",
    "run_lag",
    "run_sam_comparison",
    "sam_summary",
    "sam_table",
    "save_results",
    "save_lag_results",
    "save_sam_results",
]
