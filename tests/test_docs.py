"""The documentation cannot drift from the code: every public name has an entry in
the API reference, and every Python block on the site runs."""

import inspect
import re
import textwrap
from pathlib import Path

import pytest

import eqx_norm
from eqx_norm import data, experiments

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "assets" not in p.parts)


def _api_entries() -> set[str]:
    text = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    return set(re.findall(r"^::: ([\w.]+)", text, flags=re.M))


@pytest.mark.parametrize(
    "module, prefix",
    [
        (eqx_norm, "eqx_norm"),
        (data, "eqx_norm.data"),
        (experiments, "eqx_norm.experiments"),
    ],
)
def test_every_public_name_has_an_api_entry_and_a_docstring(module, prefix):
    entries = _api_entries()
    missing = [n for n in module.__all__ if f"{prefix}.{n}" not in entries]
    assert not missing, f"not in docs/api: {missing}"
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{prefix}.{name} has no docstring"


def _page_entries(page: str) -> list[str]:
    return re.findall(r"^::: ([\w.]+)", (DOCS / "api" / page).read_text(), flags=re.M)


def _resolve(name: str):
    module, attribute = name.rsplit(".", 1)
    return getattr({"eqx_norm": eqx_norm, "eqx_norm.data": data}[module], attribute)


@pytest.mark.parametrize(
    "name",
    [
        name
        for page in ("tools.md", "data.md")
        for name in _page_entries(page)
        if inspect.isfunction(_resolve(name))
    ],
)
def test_every_tool_and_data_function_shows_an_example(name):
    """The API reference showed no example for `set_approach`, `freeze`,
    `from_equinox`, `recalibrate`, `save`, `load`, `replicate`, `fold_into` and the
    data functions: each function on the whole-model tools' and the data page now
    shows a Python block (`tests/test_docs.py` runs the pages' blocks, not these)."""
    assert "```python\n" in (inspect.getdoc(_resolve(name)) or "")


def test_every_constant_in_the_api_reference_says_what_it_is():
    """`eqx_norm.data.DATASETS`, `MNIST_URL`, `MNIST_FILES` and
    `eqx_norm.experiments.DEFAULT_APPROACHES` were shown as a bare value: every
    public name that is neither a class nor a function now has the attribute
    docstring (a string right after its assignment) that mkdocstrings renders."""
    griffe = pytest.importorskip("griffe")
    package = griffe.load("eqx_norm", search_paths=[str(DOCS.parent)])
    constants = [
        f"{prefix}{name}"
        for module, prefix in [
            (eqx_norm, ""),
            (data, "data."),
            (experiments, "experiments."),
        ]
        for name in module.__all__
        if not inspect.isclass(getattr(module, name))
        and not inspect.isfunction(getattr(module, name))
    ]
    assert "data.MNIST_URL" in constants
    undocumented = [c for c in constants if not package[c].docstring]
    assert not undocumented, f"no attribute docstring: {undocumented}"


def _python_blocks(page: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    return [textwrap.dedent(b) for b in blocks]


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize(
    "page", [p for p in PAGES if _python_blocks(p)], ids=lambda p: p.stem
)
def test_docs_code_blocks_run(page, capsys):
    namespace: dict = {}
    for block in _python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)


def test_pages_are_in_the_nav():
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    for page in PAGES:
        relative = page.relative_to(DOCS).as_posix()
        assert relative in nav, f"{relative} is not in mkdocs.yml's nav"


def test_no_code_inside_latex_text():
    """Backticks inside `\\text{...}` render as quotes in the maths
    (docs/sam.md showed ‘adaptive=True‘): code goes outside the formula."""
    for page in PAGES + [DOCS.parent / "README.md"]:
        for match in re.finditer(r"\\text\{([^}]*)\}", page.read_text()):
            assert "`" not in match.group(1), f"{page.name}: {match.group(0)}"
