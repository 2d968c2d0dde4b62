"""The package as a user imports it, in a fresh interpreter: without being
installed, and without the runtime type checks this suite adds."""

import subprocess
import sys
import textwrap

import pytest


def _printed(script: str) -> list[str]:
    """The words `script` prints when run in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.slow  # a subprocess
def test_imports_from_a_source_tree_that_is_not_installed():
    """`import eqx_norm` from a checkout on `PYTHONPATH` (no package metadata, as on
    a machine where nothing can be installed) works, with an unknown version."""
    script = """
        import importlib.metadata as metadata

        installed = metadata.version

        def version(name):
            if name == "eqx_norm":
                raise metadata.PackageNotFoundError(name)
            return installed(name)

        metadata.version = version
        import eqx_norm

        print(eqx_norm.__version__, eqx_norm.BatchNorm.__name__)
        """
    assert _printed(script) == ["unknown", "BatchNorm"]


@pytest.mark.slow  # a subprocess
def test_string_numbers_are_refused_without_the_type_checker():
    """The suite runs with jaxtyping's runtime type checks, which would refuse a
    string where a number goes before the package's own checks ran; a user has no
    such checks. Without them (a fresh interpreter), each of these names the
    argument in a `TypeError` (`float("0.9")` would silently accept the first)."""
    script = """
        import equinox as eqx
        import optax
        import eqx_norm

        cases = {
            "momentum": lambda: eqx_norm.BatchNorm(3, "batch", momentum="0.9"),
            "eps": lambda: eqx_norm.BatchNorm(3, "batch", eps=b"1e-5"),
            "r_max": lambda: eqx_norm.Renorm(r_max="3"),
            "d_max": lambda: eqx_norm.Renorm(d_max=True),
            "max_count": lambda: eqx_norm.Running(max_count="256"),
            "every": lambda: eqx_norm.looksam(optax.sgd(0.1), every="5"),
            "alpha": lambda: eqx_norm.looksam(optax.sgd(0.1), alpha="0.7"),
            "eta": lambda: eqx_norm.sam(optax.sgd(0.1), eta=lambda t: 0.01),
            "micro_batches": lambda: eqx_norm.sam_step(
                lambda *a: a, optax.sgd(0.1), micro_batches="2"
            ),
        }
        for name, make in cases.items():
            try:
                make()
                print(name, "accepted")
            except TypeError as error:
                print(name, f"`{name}`" in str(error))
        """
    assert _printed(script) == [
        "momentum", "True", "eps", "True", "r_max", "True", "d_max", "True",
        "max_count", "True", "every", "True", "alpha", "True", "eta", "True",
        "micro_batches", "True",
    ]  # fmt: skip
