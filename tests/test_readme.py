import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    blocks = re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)
    return [textwrap.dedent(b) for b in blocks]


@pytest.mark.slow  # 14 s; each README guarantee has its own default-tier test
@pytest.mark.standard_promotion  # optax.adam
def test_readme_python_blocks_run():
    """Every Python block of the README runs, in order, in one namespace."""
    namespace: dict = {}
    blocks = _blocks("python")
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (64, 10)
    assert namespace["loss"].shape == ()


def test_ci_runs_the_readme_test_command():
    """.ci/run calls the test command that README.md gives, verbatim."""
    commands = [b.strip() for b in _blocks("bash")]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert any("eqx_norm.experiments" in c for c in commands)


def test_every_guarantee_names_an_existing_test():
    section = README.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)`", section))
    assert len(named) >= 20
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    assert named <= defined, named - defined
