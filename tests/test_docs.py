"""The README keeps up with the code: the config reference is the generated one, the quick start is two commands."""
from __future__ import annotations

import re

from launcher.contract.config import fields_markdown

from conftest import REPO

START, END = "<!-- config-fields:start -->", "<!-- config-fields:end -->"


def test_config_reference_in_readme_is_current():
    readme = (REPO / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == fields_markdown(), "README config reference is stale: run `python tests/test_docs.py`"


def test_quick_start_is_exactly_two_commands():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^(make \w+)", quick.split("```bash", 1)[1].split("```", 1)[0], flags=re.M)
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_layout_section_matches_the_tree():
    """Every package and top-level directory is described, and everything described exists."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    described = set(re.findall(r"^([\w/.]+)\s", block, flags=re.M))
    packages = {f"{p.parent.relative_to(REPO)}/" for root in ("launcher", "trainer")
                for p in (REPO / root).glob("**/__init__.py")}
    top = {f"{d}/" for d in ("ds_configs", "slurm", "examples", "tests", "bench")}
    # the project's own files: a glob from the root would also walk a virtualenv made inside the clone
    sources = [path for d in ("launcher", "trainer", *top) for path in (REPO / d.rstrip("/")).glob("**/*.py")]
    assert (packages - {"trainer/data/"}) | top <= described | {"launcher/"}, described
    for entry in described:
        assert (REPO / entry.rstrip("/")).exists(), f"README's layout names {entry}, which does not exist"
    for module in re.findall(r"\b([a-z_]+\.py)\b", block):
        assert any(path.name == module for path in sources), f"README's layout names {module}, which does not exist"


if __name__ == "__main__":  # regenerate the README's config reference
    path = REPO / "README.md"
    text = path.read_text()
    head, rest = text.split(START, 1)
    path.write_text(f"{head}{START}\n{fields_markdown()}\n{END}{rest.split(END, 1)[1]}")
