import json
import shlex
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_norm
from eqx_norm import data, experiments
from eqx_norm.experiments import __main__ as cli
from eqx_norm.experiments._instability import _report
from eqx_norm.experiments._instability._run import _batch_indices
from eqx_norm.experiments._sam import _comparison as _sam_comparison
from eqx_norm.experiments._training import loss_with_output_stats

from .helpers import stored


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax.adam
def test_default_run_reproduces_the_reports_claims():
    """The default settings (bundled digits, momentum 0.99, 3 seeds, 100 steps)
    with the three approaches the claims are about: `ema` spikes the early gradient
    norm at least 5x `batch`'s, `smooth-start` at most 2.5x, and `ema` ends with a
    higher training loss than `batch`."""
    approaches = ("batch", "ema", "smooth-start")
    config = experiments.Config(approaches=approaches)
    results = experiments.run(config, progress=False)
    claims = experiments.claims(results)
    assert claims["ema"]["early_peak_vs_reference"] >= 5
    assert claims["smooth-start"]["early_peak_vs_reference"] <= 2.5
    assert claims["ema"]["final_loss"] > claims["batch"]["final_loss"]
    assert set(results.runs) == set(approaches)
    assert set(approaches) < set(experiments.DEFAULT_APPROACHES)
    for run in results.runs.values():
        assert run["loss"].shape == (3, 100)
        assert np.all(np.isfinite(run["grad_norm"]))
        assert np.all(run["grad_norm_max_leaf"] <= run["grad_norm"] + 1e-6)
        assert np.all((run["test_accuracy"] > 0.5) & (run["test_accuracy"] <= 1))
    # Step 1 (weight 1, bias 0): `batch` output has mean 0 and std 1, less the
    # shrinkage var / (var + eps) of channels whose variance is near eps.
    np.testing.assert_allclose(results.runs["batch"]["norm_mean"][:, 0], 0, atol=1e-5)
    np.testing.assert_allclose(results.runs["batch"]["norm_std"][:, 0], 1, atol=0.01)
    assert np.all(results.runs["batch"]["norm_std"][:, 0] <= 1)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_cli_with_sam_writes_plots_json_and_claims(tmp_path, capsys):
    argv = [
        "--approaches",
        "ema",
        "--steps",
        "4",
        "--seeds",
        "2",
        "--sam",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ema + SAM" in printed and "final loss" in printed
    assert (tmp_path / "instability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((tmp_path / "results.json").read_text())
    assert set(payload["runs"]) == {"ema", "ema + SAM"}
    assert payload["config"]["sam"] is True and payload["versions"]["jax"]
    plain, with_sam = payload["runs"]["ema"], payload["runs"]["ema + SAM"]
    assert np.asarray(plain["loss"]).shape == (2, 4)
    # Same seeds, same first batch, first pass unperturbed: same step-1 figures.
    np.testing.assert_allclose(
        np.asarray(plain["loss"])[:, 0], np.asarray(with_sam["loss"])[:, 0], rtol=1e-6
    )
    # The recorded gradient norm is the norm of the first-pass gradient.
    images, labels = data.load_dataset("digits", "train")
    idx = _batch_indices(len(images), 2, 4, 64)[0, 1]
    model, state = eqx.nn.make_with_state(experiments.CNN)(
        "ema", 0.99, key=jax.random.key(1)
    )
    grads, _ = eqx.filter_grad(loss_with_output_stats, has_aux=True)(
        model, state, jnp.asarray(images[idx]), jnp.asarray(labels[idx])
    )
    leaves = [
        np.asarray(g, np.float64)
        for g in jax.tree.leaves(eqx.filter(grads, eqx.is_array))
    ]
    norm = np.sqrt(sum(np.sum(g**2) for g in leaves))
    np.testing.assert_allclose(plain["grad_norm"][1][0], norm, rtol=1e-4)
    largest = max(np.sqrt(np.sum(g**2)) for g in leaves)
    np.testing.assert_allclose(plain["grad_norm_max_leaf"][1][0], largest, rtol=1e-4)
    assert "ema" in (tmp_path / "claims.txt").read_text()


def test_cnn_shapes_and_no_norm():
    model, state = eqx.nn.make_with_state(experiments.CNN)(
        "none", key=jax.random.key(0)
    )
    assert model.norm is None
    x = jnp.zeros((5, 1, 28, 28))
    log_probs, _, out = jax.vmap(
        model, in_axes=(0, None), out_axes=(0, None, 0), axis_name="batch"
    )(x, state)
    assert log_probs.shape == (5, 10) and out.shape == (5, 512)
    np.testing.assert_allclose(jnp.sum(jnp.exp(log_probs), axis=1), 1, rtol=1e-5)


def test_accuracy_panel_is_fitted_to_the_runs():
    """Accuracies of 0.89 to 0.93 get an axis of about 0.885 to 0.935, not 0 to 1,
    so that the differences between runs are visible; every value is inside."""
    accuracy = [np.array([0.89, 0.91, 0.90]), np.array([0.92, 0.93, 0.925])]
    lo, hi = _report.accuracy_limits(accuracy)
    assert lo <= 0.89 and hi >= 0.93
    assert hi - lo <= 1.25 * (0.93 - 0.89)
    assert _report.accuracy_limits([np.array([1.0, 1.0])]) == (0.995, 1.0)


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax.adam
def test_sam_comparison_cli_writes_table_plot_and_json(tmp_path, capsys):
    """`python -m eqx_norm.experiments sam` at a tiny budget: every method runs as a
    3-seed ensemble, Adam again for the two-pass methods' gradient evaluations,
    the outputs have their shapes, and the summary is the figures' own
    arithmetic."""
    argv = ["sam", "--dataset", "digits", "--steps", "4", "--seeds", "3"]
    argv += ["--evaluations", "1", "--recalibration-batches", "2"]
    argv += ["--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    methods = experiments.SAMConfig().methods
    for method in methods:
        assert method in printed
    assert "at equal gradient evaluations" in printed and "Pays for itself" in printed
    assert (tmp_path / "sam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "table.txt").read_text() in printed
    payload = json.loads((tmp_path / "results.json").read_text())
    assert tuple(payload["runs"]) == methods + ("adam @ 8 steps",)
    assert payload["config"]["steps"] == 4 and payload["versions"]["jax"]
    assert payload["config"]["schedule"] == "cosine"
    for name, run in payload["runs"].items():
        steps = 8 if name == "adam @ 8 steps" else 4
        assert np.asarray(run["loss"]).shape == (3, steps)
        assert run["eval_steps"] == [steps]
        for key in ("test_error", "test_error_running", "test_error_tracking"):
            error = np.asarray(run[key])
            assert error.shape == (1, 3) and np.all((error > 0) & (error < 1))
        assert np.all(np.asarray(run["train_seconds"]) > 0)
    for method in methods:
        run, row = payload["runs"][method], payload["summary"]["methods"][method]
        error = np.asarray(run["test_error"])[-1]
        np.testing.assert_allclose(row["test_error"], error.mean())
        np.testing.assert_allclose(row["test_error_std"], error.std(ddof=1))
        base = payload["runs"]["adam"]["seconds_per_step"]
        np.testing.assert_allclose(
            row["time_per_step_vs_base"], run["seconds_per_step"] / base
        )
    evaluations = {m: r["gradient_evaluations"] for m, r in payload["runs"].items()}
    assert evaluations["sam"] == [8] and evaluations["looksam"] == [5]
    assert evaluations["msam"] == [4] and evaluations["adam @ 8 steps"] == [8]
    # Same seeds, same first batch, an unperturbed first pass on the whole batch:
    # the same step-1 loss for all but the per-micro-batch method, whose first pass
    # normalises each micro-batch by its own statistics, and Momentum-SAM, whose
    # first pass is at the unperturbed point too (no momentum yet).
    first = {m: np.asarray(r["loss"])[:, 0] for m, r in payload["runs"].items()}
    for method in ("sam", "asam", "sam-on", "asam-on", "looksam", "msam"):
        np.testing.assert_allclose(first[method], first["adam"], rtol=1e-6)
    assert not np.allclose(first["sam-per-micro-batch"], first["adam"], rtol=1e-6)
    comparisons = payload["summary"]["comparisons"]
    assert tuple(comparisons) == methods[1:]
    assert comparisons["sam"]["equal_gradient_evaluations"]["base_steps"] == 8
    assert comparisons["msam"]["equal_gradient_evaluations"]["base_steps"] == 4


@pytest.mark.standard_promotion  # optax.adam
def test_sam_comparison_config_errors(capsys):
    with pytest.raises(ValueError, match="unknown name 'lookasm'"):
        experiments.SAMConfig(methods=("lookasm",))
    with pytest.raises(ValueError, match=r"`batch_size` \(60\) must be a multiple"):
        experiments.SAMConfig(batch_size=60, micro_batches=8)
    with pytest.raises(ValueError, match="`every` must be at least 1"):
        experiments.SAMConfig(every=0)
    # The suite's runtime type checks refuse these first; without them, the
    # config's own checks do, with the messages in `_sam_comparison.py`.
    with pytest.raises((ValueError, TypeError), match="seeds"):
        experiments.SAMConfig(seeds=2.5)  # pyright: ignore[reportArgumentType]
    with pytest.raises((ValueError, TypeError), match="methods"):
        experiments.SAMConfig(methods="sam")  # pyright: ignore[reportArgumentType]
    # A bad radius is checked by the optimizer, which names it; the command exits 2.
    argv = ["sam", "--dataset", "digits", "--rho", "-1", "--no-progress"]
    with pytest.raises(SystemExit, match="2"):
        cli.main(argv)
    assert "--rho: must be finite and at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sam", "--methods", "lookasm"])
    assert "invalid choice: 'lookasm'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        cli.main(["sam", "--dataset", "mnist", "--data-dir", "/nonexistent"])
    assert "--data-dir: '/nonexistent' does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- the commands
# Every value is checked, and the output folder found writable, before any data is
# loaded or any step runs: these tests make loading and training fail if reached.


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Loading data or training fails the test; returns an output folder that must
    not be made."""

    def reached(*args, **kwargs):
        raise AssertionError("data was loaded or a step ran")

    monkeypatch.setattr(cli, "run", reached)
    monkeypatch.setattr(cli, "run_sam_comparison", reached)
    monkeypatch.setattr(cli, "run_lag", reached)
    monkeypatch.setattr(data, "load_dataset", reached)
    return tmp_path / "out"


def _refused(argv, flag, out, capsys, says=""):
    """`argv` is an argparse error (exit status 2, no traceback) naming `flag`,
    with no output folder made."""
    if "--out" not in argv:
        argv = argv + ["--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: " in err and says in err, err
    assert "Traceback" not in err
    assert not out.exists()


SAM = ["sam", "--dataset", "digits"]
LAG = ["lag", "--dataset", "digits"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_sam_command_trained_nan_with_a_nan_or_infinite_learning_rate(
    value, no_work, capsys
):
    _refused(SAM + ["--learning-rate", value], "--learning-rate", no_work, capsys)


def test_sam_command_let_an_every_beyond_int32_crash_the_first_step(no_work, capsys):
    """LookSAM counts steps in int32: `--every 2**40` passed the check and failed
    at the first step."""
    argv = SAM + ["--every", str(2**40)]
    _refused(argv, "--every", no_work, capsys, "must be at most 2147483647")
    with pytest.raises(ValueError, match="`every` must be at most 2147483647"):
        experiments.SAMConfig(every=2**31)
    assert experiments.SAMConfig(every=2**31 - 1).every == 2**31 - 1


@pytest.mark.parametrize("command", [[], SAM])
def test_out_naming_a_file_failed_only_after_all_training(
    command, no_work, tmp_path, capsys
):
    file = tmp_path / "a-file"
    file.write_text("")
    argv = command + ["--out", str(file)]
    _refused(argv, "--out", no_work, capsys, f"{str(file)!r} is a file")
    # A folder cannot be made inside a file either, nor over a result's name.
    argv = command + ["--out", str(file / "results")]
    _refused(argv, "--out", no_work, capsys, "cannot be made")
    (tmp_path / "taken" / "results.json").mkdir(parents=True)
    argv = command + ["--out", str(tmp_path / "taken")]
    _refused(argv, "--out", no_work, capsys, "")
    assert file.read_text() == ""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", [[], SAM])
def test_out_in_a_folder_that_cannot_be_written_is_refused(command, no_work, capsys):
    """Checked by writing, so that it holds for root and read-only mounts too."""
    argv = command + ["--out", "/proc/eqx_norm-results"]
    _refused(argv, "--out", no_work, capsys, "'/proc/eqx_norm-results' is not writable")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--momentum", "1.5"], "--momentum"),
        (["--momentum", "nan"], "--momentum"),
        (["--sam", "--rho", "-1"], "--rho"),
        (["--learning-rate", "nan"], "--learning-rate"),
        (["--learning-rate", "-0.1"], "--learning-rate"),
    ],
)
def test_main_command_checked_momentum_and_rho_only_after_the_first_run(
    argv, flag, no_work, capsys
):
    """`--momentum 1.5` and `--sam --rho -1` were refused when the run that used
    them started, after `none` had trained."""
    _refused(argv, flag, no_work, capsys)


@pytest.mark.parametrize(
    "argv, flag, says",
    [
        (["--learning-rate", "-0.003"], "--learning-rate", "must be above 0"),
        (["--learning-rate", "0"], "--learning-rate", "must be above 0"),
        (["--steps", "10", "--evaluations", "20"], "--evaluations", "at most 1"),
        (["--steps", "100", "--evaluations", "50"], "--evaluations", "at most 10"),
        (["--methods", "adam", "sam", "adam"], "--methods", "names 'adam' twice"),
    ],
)
def test_sam_command_ran_gradient_ascent_fewer_evaluations_and_a_method_twice(
    argv, flag, says, no_work, capsys
):
    _refused(SAM + argv, flag, no_work, capsys, says)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--seeds", "0"], "--seeds"),
        (["--steps", "-1"], "--steps"),
        (["--steps", str(2**31)], "--steps"),
        (["--steps", str(2**30), "--seeds", "3"], "--steps"),
        (["--batch-size", "1"], "--batch-size"),
        (["--approaches", "batch", "batch"], "--approaches"),
        (["--asam"], "--asam"),
        (["--download"], "--download"),
        (["--rho", "inf"], "--rho"),
        (["--data-dir", "tests/test_experiment.py"], "--data-dir"),
        (SAM + ["--seeds", "0"], "--seeds"),
        (SAM + ["--evaluations", "0"], "--evaluations"),
        (SAM + ["--micro-batches", "0"], "--micro-batches"),
        (SAM + ["--batch-size", "6"], "--batch-size"),
        (SAM + ["--alpha", "nan"], "--alpha"),
        (SAM + ["--asam-rho", "inf"], "--asam-rho"),
        (SAM + ["--rho", "-0.5"], "--rho"),
        (SAM + ["--every", "0"], "--every"),
        (SAM + ["--steps", str(2**31 - 1)], "--steps"),
        (SAM + ["--data-dir", "/nonexistent"], "--data-dir"),
        (LAG + ["--seeds", "0"], "--seeds"),
        (LAG + ["--momenta", "1.0"], "--momenta"),
        (LAG + ["--momenta", "0.9", "0.9"], "--momenta"),
        (LAG + ["--momenta", "nan"], "--momenta"),
        (LAG + ["--evaluations", "0"], "--evaluations"),
        (LAG + ["--evaluations", "31"], "--evaluations"),
        (LAG + ["--learning-rate", "-1"], "--learning-rate"),
        (LAG + ["--recalibration-batches", "0"], "--recalibration-batches"),
        (LAG + ["--regimes", "fast", "fast"], "--regimes"),
        (LAG + ["--data-dir", "/nonexistent"], "--data-dir"),
    ],
)
def test_hostile_values_are_argparse_errors_before_any_work(
    argv, flag, no_work, capsys
):
    _refused(argv, flag, no_work, capsys)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--seeds", "two"], "invalid int value: 'two'"),
        (["--momentum", "x"], "invalid float value: 'x'"),
        (["--approaches"], "expected at least one argument"),
        (["--approaches", "bach"], "invalid choice: 'bach'"),
        (SAM + ["--approach", "bach"], "invalid choice: 'bach'"),
        (SAM + ["--every", "2**40"], "invalid int value: '2**40'"),
        (LAG + ["--regimes", "slow"], "invalid choice: 'slow'"),
        (LAG + ["--momenta", "high"], "invalid float value: 'high'"),
    ],
)
def test_malformed_values_are_argparse_errors(argv, says, no_work, capsys):
    with pytest.raises(SystemExit, match="2"):
        cli.main(argv)
    assert says in capsys.readouterr().err


def test_missing_fashion_mnist_folder_said_pass_folder_not_data_dir(
    no_work, tmp_path, capsys
):
    """The command-line error names the flag, not the library's `folder`."""
    argv = ["sam", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)]
    _refused(argv, "--data-dir", no_work, capsys, f"{str(tmp_path)!r} holds no train")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(SystemExit):
        cli.main(argv + ["--out", str(no_work)])
    err = capsys.readouterr().err
    assert "train-labels-idx1-ubyte[.gz]" in err and "`folder`" not in err
    # Through the library, the setting's own name; still a FileNotFoundError.
    with pytest.raises(FileNotFoundError, match="`data_dir`"):
        experiments.run(experiments.Config(data_dir=str(tmp_path)))


@pytest.mark.parametrize("command", [[], ["sam"]])
def test_help_showed_no_defaults(command, capsys):
    with pytest.raises(SystemExit, match="0"):
        cli.main(command + ["--help"])
    out = capsys.readouterr().out
    for default in ("(default: 64)", "(default: 0.003)", "(default: 0.05)"):
        assert default in out
    if command:
        assert "(default: 1500)" in out and "(default: results/sam)" in out
        assert "about 20 minutes" in " ".join(out.split())
        assert "(default: fashion-mnist)" in out and "(default: 5)" in out
        assert "(default: cosine)" in out and "(default: 0.3)" in out
    else:
        assert "(default: 100)" in out and "(default: results)" in out
        assert "(default: 0.99)" in out and "(default: digits)" in out


# ------------------------------------------ the outputs, from synthetic results


def _results(seeds: int, steps: int = 5) -> experiments.Results:
    rng = np.random.default_rng(0)
    run = {
        k: rng.uniform(0.5, 2, (seeds, steps))
        for k in ("loss", "grad_norm", "grad_norm_max_leaf", "norm_mean", "norm_std")
    }
    run["test_accuracy"] = rng.uniform(0.8, 0.9, seeds)
    run["test_accuracy_recalibrated"] = rng.uniform(0.8, 0.9, seeds)
    run["seconds"] = np.asarray(1.0)
    config = experiments.Config(seeds=seeds, steps=steps, approaches=("batch", "ema"))
    return experiments.Results(config, {"batch": run, "ema": dict(run)}, {}, 1.0)


def _sam_run(rng, seeds, steps, evaluations, error):
    return {
        "loss": rng.uniform(0.1, 1, (seeds, steps)),
        "eval_steps": np.asarray([steps]),
        "gradient_evaluations": np.asarray([evaluations]),
        "test_error": error,
        "test_error_running": error + 0.01,
        "test_error_tracking": error + 0.002,
        "test_error_batch_statistics": error,
        "train_seconds": np.asarray([steps / 10]),
        "seconds_per_step": np.asarray(0.01 * evaluations / steps),
    }


def _sam_results(seeds: int) -> experiments.SAMResults:
    """Synthetic results of Adam, SAM and LookSAM over 10 steps, with Adam run
    again for 20 steps (the gradient evaluations of SAM, and LookSAM's 12 rounded
    up to a chunk); SAM's and LookSAM's test errors are Adam's after 10 steps less
    0.02 and 0.005, with noise."""
    rng = np.random.default_rng(0)
    adam_error = rng.uniform(0.1, 0.2, (1, seeds))
    runs = {
        "adam": _sam_run(rng, seeds, 10, 10, adam_error),
        "sam": _sam_run(
            rng, seeds, 10, 20, adam_error - 0.02 + rng.normal(0, 1e-3, (1, seeds))
        ),
        "looksam": _sam_run(
            rng, seeds, 10, 12, adam_error - 0.005 + rng.normal(0, 1e-3, (1, seeds))
        ),
        "adam @ 20 steps": _sam_run(
            rng, seeds, 20, 20, adam_error - 0.03 + rng.normal(0, 0.01, (1, seeds))
        ),
    }
    config = experiments.SAMConfig(
        dataset="digits",
        methods=("adam", "sam", "looksam"),
        seeds=seeds,
        steps=10,
        evaluations=1,
    )
    return experiments.SAMResults(config, runs, {}, 1.0)


@pytest.mark.parametrize("seeds", [1, 2])
def test_sam_summary_gives_no_verdict_below_three_seeds(seeds):
    """`± 0.0000` and "sam beats adam: holds" came from one seed, and two seeds gave
    intervals of about ±0.75 that made "no clear difference" certain: below three
    seeds there is no verdict, and a line saying why."""
    results = _sam_results(seeds)
    summary = experiments.sam_summary(results)
    assert summary.comparisons == {} and "at least 3 seeds" in (
        summary.no_verdicts or ""
    )
    if seeds == 1:
        assert all(row.test_error_std is None for row in summary.methods.values())
    table = experiments.sam_table(results)
    assert "better" not in table and "0.0000 " not in table.split("\n")[1]
    assert "no verdict" in table and "at least 3 seeds" in table
    three = experiments.sam_summary(_sam_results(3))
    assert "sam" in three.comparisons and three.no_verdicts is None
    assert "paired by seed" in experiments.sam_table(_sam_results(3))


def test_sam_verdicts_are_paired_at_equal_steps_and_at_equal_evaluations():
    """SAM is 0.02 below Adam after the same steps, seed by seed: "sam better" at
    equal steps; against Adam run for SAM's 20 gradient evaluations, the paired
    difference is the arithmetic of those runs, its interval Student's t (SciPy's)
    with a sample standard deviation, and its verdict worded by what it
    resolves."""
    results = _sam_results(3)
    summary = experiments.sam_summary(results)
    sam = summary.comparisons["sam"]
    assert sam.equal_steps.verdict == "sam better"
    np.testing.assert_allclose(sam.equal_steps.difference, -0.02, atol=2e-3)
    at_evals = sam.equal_gradient_evaluations
    assert at_evals.base_steps == 20 and at_evals.base_gradient_evaluations == 20
    d = (
        results.runs["sam"]["test_error"][0]
        - results.runs["adam @ 20 steps"]["test_error"][0]
    )
    half = scipy_stats().t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(at_evals.difference, d.mean())
    np.testing.assert_allclose(at_evals.interval, [d.mean() - half, d.mean() + half])
    np.testing.assert_allclose(at_evals.half_width, half)
    lo, hi = d.mean() - half, d.mean() + half
    expected = (
        "sam better"
        if hi < 0
        else "adam better"
        if lo > 0
        else f"no difference larger than {max(abs(lo), abs(hi)):.3f}"
    )
    assert at_evals.verdict == expected
    assert summary.pays_for_itself == [
        m
        for m, c in summary.comparisons.items()
        if c.equal_gradient_evaluations.verdict == f"{m} better"
    ]
    # LookSAM's 12 gradient evaluations are matched by Adam run to the chunk's end.
    assert summary.comparisons["looksam"].equal_gradient_evaluations.base_steps == 20
    row, matches = summary.base_continued[20]
    assert row.gradient_evaluations == 20 and matches == ["sam", "looksam"]
    # The table's "±" is the sample standard deviation, as the intervals'.
    adam = results.runs["adam"]["test_error"][-1]
    std = summary.methods["adam"].test_error_std
    assert std is not None
    np.testing.assert_allclose(std, adam.std(ddof=1))
    payload = results.to_json()["summary"]
    assert set(payload["comparisons"]["sam"]) == {
        "equal_steps",
        "equal_gradient_evaluations",
    }
    for kind in ("difference", "interval", "verdict"):
        assert kind in payload["comparisons"]["sam"]["equal_steps"]


def scipy_stats():
    return pytest.importorskip("scipy.stats")


def test_verdicts_say_what_they_resolve_never_that_methods_do_as_well():
    """Within its spread a difference is "no difference larger than" the
    interval's far end: the largest difference the data leave open, never "does as
    well" or "no clear difference"."""
    from eqx_norm.experiments._sam import _summary as _sam_summary

    results = _sam_results(5)
    table = experiments.sam_table(results)
    for wording in ("as well", "as good", "no clear difference", "beats"):
        assert wording not in table
    mean, half, p = _sam_summary._paired([0.10, 0.12, 0.14], [0.11, 0.11, 0.13])
    verdict = _sam_summary._verdict(mean, half, "sam", "adam")
    assert verdict == f"no difference larger than {abs(mean) + half:.3f}"
    assert 0 < p < 1
    mean, half, _ = _sam_summary._paired([0.16, 0.165, 0.19], [0.11, 0.11, 0.13])
    assert _sam_summary._verdict(mean, half, "sam", "adam") == "adam better"
    assert "smallest difference it resolves" in table and "Holm" in table


def test_holm_adjusts_over_the_family():
    from eqx_norm.experiments._sam import _summary as _sam_summary

    adjusted = _sam_summary._holm({"a": 0.01, "b": 0.04, "c": 0.03})
    np.testing.assert_allclose(
        [adjusted["a"], adjusted["c"], adjusted["b"]], [0.03, 0.06, 0.06]
    )


def test_t_quantile_is_scipys():
    from eqx_norm.experiments._sam import _summary as _sam_summary

    for df in (1, 2, 4, 30, 1000):
        assert _sam_summary.t_quantile(df) == scipy_stats().t.ppf(0.975, df)
    with pytest.raises(ValueError, match="`df` must be at least 1"):
        _sam_summary.t_quantile(0)


def test_gradient_evaluations_and_the_base_runs():
    g = _sam_comparison.gradient_evaluations
    assert [g(m, 10, 5) for m in ("adam", "msam", "sam", "asam-on", "looksam")] == [
        10,
        10,
        20,
        20,
        12,
    ]
    assert g("looksam", 11, 5) == 14  # steps 0, 5 and 10 take the second pass
    lengths = _sam_comparison.base_lengths(experiments.SAMConfig(dataset="digits"))
    assert lengths["adam"] == lengths["msam"] == 1500
    assert lengths["looksam"] == 1800 and lengths["sam-per-micro-batch"] == 3000


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_schedule_spans_each_runs_own_steps(schedule):
    """Cosine decays Adam's rate to zero over each run's own steps (the base's
    longer runs over their own length); constant keeps it. Checked on the updates
    of a constant gradient: Adam's step is the learning rate then."""
    import optax

    config = experiments.SAMConfig(dataset="digits", schedule=schedule)
    for steps in (10, 30):
        opt = _sam_comparison._optimizer("adam", config, steps)
        params = {"w": jnp.zeros(())}
        state = opt.init(params)
        sizes = []
        for _ in range(steps + 1):
            updates, state = opt.update({"w": jnp.ones(())}, state, params)
            sizes.append(float(-updates["w"]))
        expected = (
            [
                float(np.asarray(optax.cosine_decay_schedule(3e-3, steps)(t)))
                for t in range(steps + 1)
            ]
            if schedule == "cosine"
            else [3e-3] * (steps + 1)
        )
        np.testing.assert_allclose(sizes, expected, rtol=1e-3, atol=1e-9)
    with pytest.raises(experiments.SettingError, match="`schedule` must be one of"):
        experiments.SAMConfig(schedule="linear")


@pytest.mark.slow  # a whole comparison, compiled for two methods (about 30 s)
@pytest.mark.standard_promotion  # optax.adam
def test_every_reading_is_recalibrated_from_one_set_of_batches(monkeypatch):
    """The test error the verdicts use is read with statistics recalibrated at the
    run's weights, from the same training batches for every method; the running
    and tracking readings are recorded beside it."""
    from eqx_norm.experiments import _training as training

    seen = []
    real = _sam_comparison._train

    def spy(method, steps, config, data, indices, recalibration, *rest):
        seen.append(recalibration)
        return real(method, steps, config, data, indices, recalibration, *rest)

    monkeypatch.setattr(_sam_comparison, "_train", spy)
    config = experiments.SAMConfig(
        dataset="digits",
        methods=("adam", "msam"),
        seeds=2,
        steps=10,
        evaluations=1,
        recalibration_batches=3,
    )
    results = experiments.run_sam_comparison(config, progress=False)
    assert len(seen) == 2 and seen[0] is seen[1] and len(seen[0]) == 3
    train, _ = training.load_splits("digits", None)
    for a, b in zip(seen[0], training.recalibration_batches(train[0], 3)):
        np.testing.assert_array_equal(a, b)
    run = results.runs["msam"]
    for key in ("test_error", "test_error_running", "test_error_tracking"):
        assert run[key].shape == (1, 2)
    # Momentum-SAM's running statistics come from its perturbed passes: they read
    # another error than the same weights recalibrated.
    assert not np.allclose(run["test_error_running"], run["test_error"])


def _figure(monkeypatch, module, plot, results):
    figures = []

    def keep(fig, path, **layout):
        figures.append(fig)
        return Path(path)

    monkeypatch.setattr(module, "save_figure", keep)
    plot(results, "unused.png")
    return figures[0]


@pytest.mark.parametrize("seeds", [1, 3])
def test_figures_did_not_say_what_their_marks_are(monkeypatch, seeds):
    """The instability figure's lines are medians and its bands ranges over seeds;
    the SAM figure's points are means and its bars ranges (its table: the standard
    deviation and the range). Each says so on the figure, in its legend."""
    import matplotlib.pyplot as plt

    fig = _figure(monkeypatch, _report, experiments.plot, _results(seeds))
    legend = fig.axes[0].get_legend().get_title().get_text()
    from eqx_norm.experiments._sam import _summary as _sam_summary

    fig_sam = _figure(
        monkeypatch, _sam_summary, experiments.plot_sam, _sam_results(seeds)
    )
    legend_sam = fig_sam.legends[0].get_title().get_text()
    if seeds == 1:
        assert "no bands" in legend and "no bars" in legend_sam
    else:
        assert legend == "lines: median over 3 seeds; bands: range (min to max)"
        assert legend_sam == "points: mean over 3 seeds; bars: range (min to max)"
    plt.close("all")


@pytest.mark.parametrize("command", [[], ["sam"]])
def test_each_command_wires_config_run_save_and_table(
    command, monkeypatch, tmp_path, capsys
):
    """The commands in-process, with the training replaced by synthetic results:
    the flags reach the configuration, and the outputs are written and printed."""
    seen = []

    def fake(config, *, progress):
        seen.append((config, progress))
        return _sam_results(2) if command else _results(2)

    monkeypatch.setattr(cli, "run_sam_comparison" if command else "run", fake)
    argv = command + ["--dataset", "digits", "--seeds", "2", "--steps", "10"]
    argv += ["--out", str(tmp_path), "--no-progress"]
    argv += ["--asam-rho", "0.3", "--evaluations", "1"] if command else ["--sam"]
    assert cli.main(argv) == 0
    config, progress = seen[0]
    assert (config.seeds, config.steps, progress) == (2, 10, False)
    assert config.asam_rho == 0.3 if command else config.sam
    printed = capsys.readouterr().out
    names = ("sam.png", "table.txt") if command else ("instability.png", "claims.txt")
    for name in names + ("results.json",):
        assert str(tmp_path / name) in printed and (tmp_path / name).is_file()


def test_docs_build_ran_the_experiment_silently(monkeypatch, tmp_path, caplog):
    """The first `mkdocs build` runs the experiment (about a minute): it says what
    it runs, and when it is done."""
    import importlib.util
    import logging

    spec = importlib.util.spec_from_file_location("docs_hooks", "docs/hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    monkeypatch.setattr(hooks, "HERE", tmp_path)
    monkeypatch.setattr(experiments, "run", lambda config, progress: _results(1))

    def save(results, out):
        return {"plot": Path(out) / "instability.png"}

    monkeypatch.setattr(experiments, "save_results", save)
    with caplog.at_level(logging.INFO, logger="mkdocs"):
        hooks.on_pre_build(None)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("Running the instability experiment")
    assert messages[1].startswith("Ran the instability experiment in")
    assert "instability.png" in messages[1]


def test_experiments_use_only_the_public_api():
    """The SAM comparison borrowed six private helpers of its sibling: what the
    experiments share is in modules of their own, under public names, and they
    import from the package only its public API."""
    import ast

    for path in Path("eqx_norm/experiments").rglob("*.py"):
        # The relative level that reaches `eqx_norm` itself from this module.
        package = len(path.relative_to("eqx_norm").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert not (node.level == package and module.startswith("_")), path
                assert not module.startswith("eqx_norm._"), path
                if node.level < package and not module:
                    continue  # a module of the experiments, as a whole
                for alias in node.names:
                    assert not alias.name.startswith("_"), (path, alias.name)


# ------------------------------------------------------------- the benchmarks
# Their flags are checked by argparse before anything compiles; these tests parse
# in-process and never time anything.


def _benchmark(name, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend("benchmarks")
    return importlib.import_module(name)


def _bench_refused(parse, argv, flag, capsys, says=""):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: " in err and says in err, err


def test_benchmark_one_number_shape_was_an_index_error(monkeypatch, capsys):
    """`--shapes 64` and `--shape 512` crashed with an IndexError traceback."""
    bench = _benchmark("bench_batch_norm", monkeypatch)
    kernels = _benchmark("list_kernels", monkeypatch)
    _bench_refused(bench.parse_args, ["--shapes", "64"], "--shapes", capsys, "N,C")
    _bench_refused(
        kernels.parser().parse_args, ["--shape", "512"], "--shape", capsys, "N,C"
    )
    assert bench.parse_args(["--shapes", "2,512", "8,3,4,4"]).shapes == [
        (2, 512),
        (8, 3, 4, 4),
    ]


def test_benchmark_batch_without_variance_or_ghost_batches_failed_late(
    monkeypatch, capsys
):
    """A batch of one without spatial axes (no batch variance) and `--options`
    with a batch that ghost batches of 16 cannot split failed after compiling."""
    bench = _benchmark("bench_batch_norm", monkeypatch)
    kernels = _benchmark("list_kernels", monkeypatch)
    models = _benchmark("bench_models", monkeypatch)
    _bench_refused(bench.parse_args, ["--shapes", "1,512"], "--shapes", capsys)
    _bench_refused(kernels.parser().parse_args, ["--shape", "1,64"], "--shape", capsys)
    argv = ["--options", "--shapes", "64,512", "40,512"]
    _bench_refused(bench.parse_args, argv, "--shapes", capsys, "multiple of 16")
    assert bench.parse_args(["--shapes", "1,3,4,4"]).shapes == [(1, 3, 4, 4)]
    _bench_refused(models.parse_args, ["--batch", "1"], "--batch", capsys, "below 2")


# Command lines each script refuses (as typed in a shell); the error names the first
# flag.
@pytest.mark.parametrize(
    "script, command",
    [
        ("bench_batch_norm", "--rounds 0"),
        ("bench_batch_norm", "--calls -1"),
        ("bench_batch_norm", "--shapes 64,0"),
        ("bench_batch_norm", "--shapes 64,,512"),
        ("bench_batch_norm", "--shapes ''"),
        ("bench_batch_norm", "--shapes 64,512 64,512"),
        ("bench_batch_norm", "--shapes 65536,65536"),
        ("bench_batch_norm", "--rounds 1e3"),
        ("list_kernels", "--shape 64,x"),
        ("list_kernels", "--dtype float16"),
        ("list_kernels", "--hlo /nonexistent"),
        ("list_kernels", "--hlo tests/test_experiment.py"),
        ("bench_models", "--models mlp mlp"),
        ("bench_models", "--models vgg"),
        ("bench_models", "--compiles 0"),
        ("bench_models", "--batch nan"),
        ("bench_training", "--rounds -3"),
        ("bench_fold", "--rounds 0"),
    ],
)
def test_benchmark_flags_refuse_zero_negative_and_malformed_values(
    script, command, monkeypatch, capsys
):
    module = _benchmark(script, monkeypatch)
    parse = getattr(module, "parse_args", None) or module.parser().parse_args
    argv = shlex.split(command)
    _bench_refused(parse, argv, argv[0], capsys)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 1}, "`batch_size` must be at least 2"),
        ({"steps": 0}, "`steps` must be at least 1"),
        ({"seeds": 0}, "`seeds` must be at least 1"),
        ({"approaches": ("bach",)}, "unknown approach 'bach'"),
        ({"approaches": ()}, "`approaches` is empty"),
        ({"dataset": "cifar"}, "`dataset` must be one of"),
    ],
    ids=["batch-1", "steps-0", "seeds-0", "unknown-approach", "no-approach", "cifar"],
)
def test_experiment_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        experiments.Config(**kwargs)


# ------------------------------------------------------------ the lag experiment


def _layer(approach, momentum=0.99):
    return eqx.nn.make_with_state(eqx_norm.BatchNorm)(
        5, "batch", approach=approach, momentum=momentum
    )


def _run_layer(bn, x, state):
    return jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(
        x, state
    )


def test_side_by_side_keeps_each_approach_as_its_own_layer_would(getkey):
    """The lag experiment trains once and reads every approach: its strategy
    trains as `batch` does, and the statistics it keeps for each approach equal
    those of a layer of that approach trained on the same batches (the same
    formula, about another shift)."""
    from eqx_norm.experiments._lag._run import side_by_side
    from eqx_norm.experiments._side_by_side import SideBySide

    approach = side_by_side(experiments.LagConfig())
    assert isinstance(approach, SideBySide)
    ours, state = _layer(approach)
    plain, plain_state = _layer("batch")
    theirs = {label: _layer(a, m) for label, a, m in approach.compared}
    for t in range(12):
        x = (1 + 0.2 * t) * jax.random.normal(getkey(), (16, 5, 3)) + 0.1 * t
        y, state = _run_layer(ours, x, state)
        y_batch, plain_state = _run_layer(plain, x, plain_state)
        np.testing.assert_allclose(y, y_batch, rtol=1e-5, atol=1e-5)
        for label, (bn, other) in theirs.items():
            theirs[label] = (bn, _run_layer(bn, x, other)[1])
    for label, (bn, other) in theirs.items():
        kept = stored(state, ours.state_index).extra[label]
        for a, b in zip((kept.mean, kept.var), bn.statistics(other)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=label)


@pytest.mark.slow  # a whole lag run, compiled for every reading (about 10 s)
@pytest.mark.standard_promotion  # optax.adam
def test_lag_experiment_reads_every_approach_and_recalibrated(tmp_path):
    """A small run: every reading at every evaluation, the summary from them, the
    outputs written; the recalibrated reading is what `recalibrate` gives."""
    config = experiments.LagConfig(
        dataset="digits",
        regimes=("noisy-moving",),
        seeds=2,
        steps=20,
        evaluations=2,
        recalibration_batches=3,
    )
    results = experiments.run_lag(config, progress=False)
    run = results.runs["noisy-moving"]
    assert run["eval_steps"].tolist() == [10, 20]
    assert run["loss"].shape == (2, 20) and np.all(np.isfinite(run["loss"]))
    assert list(run["accuracy"]) == results.readings()
    assert results.readings()[-2:] == ["running, tracking", "recalibrated"]
    for values in run["accuracy"].values():
        assert values.shape == (2, 2) and np.all((values > 0) & (values <= 1))
    summary = experiments.lag_summary(results)["noisy-moving"]
    base = run["accuracy"]["batch statistics"]
    for label, row in summary.items():
        a = run["accuracy"][label]
        np.testing.assert_allclose(row["final"], a[:, -1].mean())
        np.testing.assert_allclose(
            row["final_vs_batch_statistics_per_seed"], a[:, -1] - base[:, -1]
        )
        np.testing.assert_allclose(
            row["all_evaluations_vs_batch_statistics"], np.mean(a - base)
        )
    paths = experiments.save_lag_results(results, tmp_path)
    payload = json.loads(paths["json"].read_text())
    assert payload["dataset"] == "digits" and payload["summary"]["noisy-moving"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = paths["table"].read_text()
    assert "running, tracking" in table and "(here 20 steps)" in table


def test_lag_falls_back_to_the_digits_where_fashion_mnist_is_missing(monkeypatch):
    """Fashion-MNIST by default; the bundled digits where it is not installed (and
    no `data_dir` names a folder), as the command says."""
    from eqx_norm.experiments._lag import _run as _lag

    monkeypatch.setattr(data, "FASHION_MNIST", Path("/nonexistent"))
    seen = []

    class Loaded(Exception):
        pass

    def load_splits(dataset, data_dir, download=False):
        seen.append((dataset, data_dir))
        raise Loaded

    monkeypatch.setattr(_lag.training, "load_splits", load_splits)
    with pytest.raises(Loaded):
        experiments.run_lag(experiments.LagConfig(seeds=1), progress=False)
    assert seen == [("digits", None)]
    # A folder that is named but holds no files is an error, not a fallback.
    config = experiments.LagConfig(seeds=1, data_dir="/nonexistent")
    with pytest.raises(experiments.DataNotFoundError, match="`data_dir`"):
        experiments.run_lag(config, progress=False)


def test_lag_help_shows_every_default(capsys):
    with pytest.raises(SystemExit, match="0"):
        cli.main(["lag", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in (
        "(default: fashion-mnist)",
        "(default: ['fast', 'settled', 'noisy', 'noisy-moving'])",
        "(default: 2)",
        "(default: 0.003)",
        "(default: [0.99, 0.9, 0.5, 0.0])",
        "(default: 6)",
        "(default: 50)",
        "(default: results/lag)",
    ):
        assert default in out, default


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax.adam
def test_lag_cli_writes_table_figure_and_json(tmp_path, capsys):
    """`python -m eqx_norm.experiments lag` at a tiny budget, the residual CNN too."""
    argv = ["lag", "--dataset", "digits", "--regimes", "fast", "noisy", "--steps"]
    argv += ["10", "--seeds", "1", "--evaluations", "1"]
    argv += ["--recalibration-batches", "2", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "table.txt").read_text() in printed
    payload = json.loads((tmp_path / "results.json").read_text())
    assert list(payload["runs"]) == ["fast", "noisy"]
    assert (tmp_path / "lag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
