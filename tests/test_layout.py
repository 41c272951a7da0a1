"""The house keeps its layers: what each package may import, and one owner for every run-directory name.

Read from the source with `ast` and `tokenize`, so the rules hold for code paths no other test runs.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from launcher.contract import run_dir

from conftest import REPO

PRODUCT = ("launcher", "trainer")

# package prefix -> the packages of ours it may import (itself included).
ALLOWED = {
    "launcher": (),
    "launcher.contract": ("launcher.contract",),
    "launcher.backends": ("launcher.contract", "launcher.backends"),
    "launcher.planning": ("launcher.contract", "launcher.backends", "launcher.planning"),
    "launcher.cli": ("launcher",),  # and the trainer, lazily inside a command (checked below)
    "trainer.tools": ("launcher.contract", "launcher.backends", "launcher.planning", "trainer"),
    "trainer": ("launcher.contract", "launcher.backends", "launcher.planning", "trainer"),
}


def modules() -> list[tuple[str, Path]]:
    out = []
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out.append((name.removesuffix(".__init__"), path))
    return out


def imports(path: Path, top_level_only: bool) -> list[str]:
    """Modules of ours imported by a file; top_level_only: not inside a function (lazy imports)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [m for m in found if m.split(".")[0] in PRODUCT]


def owner(module: str) -> str:
    return max((prefix for prefix in ALLOWED if module == prefix or module.startswith(prefix + ".")), key=len)


@pytest.mark.parametrize("name,path", modules(), ids=[m for m, _ in modules()])
def test_each_module_imports_only_the_layers_below_it(name, path):
    allowed = ALLOWED[owner(name)]
    lazy_ok = ("trainer",) if name == "launcher.cli" else ()
    eager = imports(path, top_level_only=True)
    bad = [m for m in imports(path, top_level_only=False)
           if not m.startswith(allowed) and not (m.startswith(lazy_ok) and m not in eager)]
    assert not bad, f"{name} may import only {allowed}; it imports {bad}"


def test_rank_code_never_imports_the_tools_or_the_cli():
    for name, path in modules():
        if name.startswith("trainer") and not name.startswith("trainer.tools"):
            assert not [m for m in imports(path, False) if m.startswith(("trainer.tools", "launcher.cli"))], name


def _names() -> set[str]:
    """Every file name in a run directory, as the contract spells it."""
    return {run_dir.CONFIG, run_dir.DS_CONFIG, *run_dir.SCRIPTS.values(), run_dir.METRICS, run_dir.STATUS,
            run_dir.STOP, run_dir.WANDB_ID, run_dir.PREFLIGHT, run_dir.PREFLIGHT_PROBES, run_dir.SLURM_JOBS,
            run_dir.HEARTBEATS, run_dir.STACKS, run_dir.NCCL_TRACES, run_dir.CHECKPOINTS, run_dir.FINAL,
            run_dir.LATEST, run_dir.DS_LATEST, run_dir.MANIFEST, run_dir.TRAINER_STATE, run_dir.RNG, run_dir.HF,
            run_dir.OWNER, run_dir.EVENTS}


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal that is not a docstring."""
    source = path.read_text()
    docstrings = {node.body[0].value.lineno for node in ast.walk(ast.parse(source))
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and tok.start[0] not in docstrings:
            out.append((tok.start[0], tok.string))
        elif tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            out.append((tok.start[0], tok.string))
    return out


def _joined_names(path: Path, names: set[str]) -> list[int]:
    """Lines where code builds a path as `something / "name"` with a run-directory name."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant) and node.right.value in names]


def bench_modules() -> list[tuple[str, Path]]:
    """The benchmarks read run directories too, through the same reader (launcher.contract.run_dir.RunDir)."""
    return [(".".join(p.relative_to(REPO).with_suffix("").parts), p) for p in sorted((REPO / "bench").glob("*.py"))]


def suite_modules() -> list[tuple[str, Path]]:
    """Tests read and damage run directories through the contract's names too (this file lists them)."""
    return [(p.stem, p) for p in sorted((REPO / "tests").glob("*.py")) if p.name != "test_layout.py"]


def test_no_run_directory_file_name_is_spelled_out_outside_the_contract():
    """A name spelled out in a second place is a second owner: the two drift apart."""
    names = _names()
    pattern = re.compile("|".join(rf"(?<![\w.-]){re.escape(n)}(?![\w.])" if "." in n else
                                  rf"(?<![\w.-]){re.escape(n)}/|/{re.escape(n)}(?![\w.])" for n in names))
    found = []
    for name, path in modules() + bench_modules() + suite_modules():
        if name == "launcher.contract.run_dir":
            continue
        found += [f"{path.relative_to(REPO)}:{line}: / a run-directory name" for line in _joined_names(path, names)]
        for line, text in _string_literals(path):
            if pattern.search(text):
                found.append(f"{path.relative_to(REPO)}:{line}: {text}")
    assert not found, "\n".join(found)


def test_the_readme_layout_names_every_module():
    """A module the README's Layout does not name is one a reader cannot place in the layers."""
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    missing = [str(path.relative_to(REPO)) for path in [*REPO.glob("launcher/**/*.py"), *REPO.glob("trainer/*.py"),
                                                        *REPO.glob("trainer/tools/*.py")]
               if path.name not in ("__init__.py", "__main__.py") and path.name not in layout]
    assert not missing, f"README.md's Layout does not name {missing}"
