"""The package as a user imports it, in a fresh interpreter: without being
installed, and without the runtime type checks this suite adds; and as a package
index shows it, from the built distributions' metadata."""

import email
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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


# A link or image target with a scheme (`https:`, `mailto:`) or an anchor only.
_ABSOLUTE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:|#")


@pytest.mark.slow  # installs the build backend from the package index, then builds
def test_long_description_has_no_relative_links(tmp_path):
    """The long description is README.md, whose relative links (`docs/...`,
    `examples/...`, the figure) lead nowhere outside the repository: in the built
    sdist's and wheel's metadata each is its text and its path in the source
    distribution, that path is there, and every other line is README.md's."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    backend, dist = tmp_path / "backend", tmp_path / "dist"
    requires = pyproject["build-system"]["requires"]
    _run_module("pip", "install", "-q", "--target", str(backend), *requires)
    _run_module("hatchling", "build", "-d", str(dist), PYTHONPATH=str(backend))
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        (pkg_info,) = [n for n in names if n.count("/") == 1 and n.endswith("PKG-INFO")]
        in_sdist = {n.split("/", 1)[1] for n in names if "/" in n}
        member = archive.extractfile(pkg_info)
        assert member is not None
        sdist_metadata = member.read()
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        wheel_metadata = archive.read(name)
    readme = (ROOT / "README.md").read_text().splitlines()
    for raw in (sdist_metadata, wheel_metadata):
        metadata = email.message_from_string(raw.decode())
        assert metadata["Description-Content-Type"] == "text/markdown"
        description = str(metadata.get_payload()).splitlines()
        assert _relative_links(description) == [], "relative links remain"
        assert any("](https://" in line for line in description), "absolute ones stay"
        # Only the lines with a relative link changed, each to name the path, which
        # the source distribution holds.
        assert len(description) == len(readme)
        changed = [(r, d) for r, d in zip(readme, description) if r != d]
        assert [r for r, _ in changed] == [r for r in readme if _relative_links([r])]
        for line, rewritten in changed:
            for path in _relative_links([line]):
                assert path in in_sdist, path
                assert f"`{path}`" in rewritten, rewritten
                assert "in the source distribution" in rewritten, rewritten


def _run_module(*args: str, **env: str) -> None:
    """`python -m *args` in the repository's root, with `env` added to ours."""
    out = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr


def _relative_links(lines: list[str]) -> list[str]:
    """The targets of Markdown links and images, and of HTML `src` and `href`
    attributes, in `lines` that are neither URLs nor anchors."""
    text = "\n".join(lines)
    targets = re.findall(r"\]\(([^)\s]*)", text)
    targets += re.findall(r"(?:src|href)=[\"']([^\"']*)", text)
    return [t for t in targets if not _ABSOLUTE.match(t)]
