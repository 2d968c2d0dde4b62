"""MkDocs hook: the plots on "Choosing an approach" are made by the experiment's own
code at build time (the default run, about 30 s), not pasted."""

from pathlib import Path

HERE = Path(__file__).parent


def on_pre_build(config, **kwargs):
    out = HERE / "generated"
    if (out / "instability.png").exists():
        return
    from eqx_norm import experiments

    results = experiments.run(experiments.Config(), progress=False)
    experiments.save_results(results, out)
