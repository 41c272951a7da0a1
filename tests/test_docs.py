"""The README keeps up with the code: the config reference is the generated one, the quick start is two commands."""
from __future__ import annotations

import re

from conftest import REPO
from launcher.config import fields_markdown

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


if __name__ == "__main__":  # regenerate the README's config reference
    path = REPO / "README.md"
    text = path.read_text()
    head, rest = text.split(START, 1)
    path.write_text(f"{head}{START}\n{fields_markdown()}\n{END}{rest.split(END, 1)[1]}")
