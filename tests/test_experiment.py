import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_norm import data, experiments
from eqx_norm.experiments import __main__ as cli, _report
from eqx_norm.experiments._run import _batch_indices, _loss_fn


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
    grads, _ = eqx.filter_grad(_loss_fn, has_aux=True)(
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


def test_cli_and_config_errors(capsys):
    with pytest.raises(ValueError, match="Unknown approach 'bach'"):
        experiments.Config(approaches=("bach",))
    with pytest.raises(ValueError, match="`seeds` must be at least 1"):
        experiments.Config(seeds=0)
    with pytest.raises(ValueError, match="`batch_size` must be at least 2"):
        experiments.Config(batch_size=1)
    with pytest.raises(SystemExit):
        cli.main(["--approaches", "bach"])
    assert "invalid choice: 'bach'" in capsys.readouterr().err


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


@pytest.mark.standard_promotion  # optax.adam
def test_sam_comparison_cli_writes_table_plot_and_json(tmp_path, capsys):
    """`python -m eqx_norm.experiments sam` at a tiny budget: every method runs, the
    outputs have their shapes, and the summary is the figures' own arithmetic."""
    argv = ["sam", "--dataset", "digits", "--steps", "4", "--seeds", "1"]
    argv += ["--evaluations", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    methods = ("adam", "sam", "asam", "looksam", "sam-per-micro-batch")
    for method in methods:
        assert method in printed
    assert "sam beats adam:" in printed and "looksam costs at most 1.3x" in printed
    assert (tmp_path / "sam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "table.txt").read_text() in printed
    payload = json.loads((tmp_path / "results.json").read_text())
    assert tuple(payload["runs"]) == methods
    assert payload["config"]["steps"] == 4 and payload["versions"]["jax"]
    for method, run in payload["runs"].items():
        assert np.asarray(run["loss"]).shape == (1, 4)
        assert run["eval_steps"] == [4]
        error = np.asarray(run["test_error"])
        assert error.shape == (1, 1) and np.all((error > 0) & (error < 1))
        assert np.all(np.asarray(run["train_seconds"]) > 0)
        row = payload["summary"]["methods"][method]
        np.testing.assert_allclose(row["test_error"], error[-1].mean())
        np.testing.assert_allclose(row["test_error_std"], error[-1].std())
        base = np.median(payload["runs"]["adam"]["seconds_per_step"])
        np.testing.assert_allclose(
            row["time_per_step_vs_base"], np.median(run["seconds_per_step"]) / base
        )
    # Same seeds, same first batch, an unperturbed first pass on the whole batch:
    # the same step-1 loss for all but the per-micro-batch method, whose first pass
    # normalises each micro-batch by its own statistics.
    first = {m: np.asarray(r["loss"])[:, 0] for m, r in payload["runs"].items()}
    for method in ("sam", "asam", "looksam"):
        np.testing.assert_allclose(first[method], first["adam"], rtol=1e-6)
    assert not np.allclose(first["sam-per-micro-batch"], first["adam"], rtol=1e-6)
    assert payload["summary"]["claims"].keys() == {
        "sam beats adam",
        "asam beats adam",
        "looksam costs at most 1.3x adam",
        "looksam keeps most of sam's gain",
    }


@pytest.mark.standard_promotion  # optax.adam
def test_sam_comparison_config_errors(capsys):
    with pytest.raises(ValueError, match="Unknown method 'lookasm'"):
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
    # A bad radius reaches the optimizer, which names it; the command exits 2.
    argv = ["sam", "--dataset", "digits", "--rho", "-1", "--no-progress"]
    assert cli.main(argv) == 2
    assert "`rho` must be finite and at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sam", "--methods", "lookasm"])
    assert "invalid choice: 'lookasm'" in capsys.readouterr().err
    assert cli.main(["sam", "--dataset", "mnist", "--data-dir", "/nonexistent"]) == 2
    assert "error:" in capsys.readouterr().err
