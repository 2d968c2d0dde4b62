"""MkDocs hook: the plots on "Choosing an approach" are made by the experiment's own
code at build time (the default run, about a minute on 2 cores), not pasted. The
build says what it runs and when it is done, so that the wait is not silent."""

import logging
import time
from pathlib import Path

HERE = Path(__file__).parent
log = logging.getLogger("mkdocs.hooks.experiment")


def on_pre_build(config, **kwargs):
    out = HERE / "generated"
    if (out / "instability.png").exists():
        return
    from eqx_norm import experiments

    settings = experiments.Config()
    log.info(
        "Running the instability experiment for the docs' plots (%d approaches, "
        "%d seeds, %d steps; about a minute, once: it is kept in %s) ...",
        len(settings.approaches),
        settings.seeds,
        settings.steps,
        out,
    )
    start = time.perf_counter()
    results = experiments.run(settings, progress=False)
    paths = experiments.save_results(results, out)
    log.info(
        "Ran the instability experiment in %.0f s; wrote %s.",
        time.perf_counter() - start,
        ", ".join(p.name for p in paths.values()),
    )
