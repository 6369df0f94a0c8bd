"""dvc.yaml cannot drift from the code: each stage's deps list exactly the repo modules its command imports
(transitively, lazy imports inside functions included), and its outs are the paths of mpad.layout."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PACKAGES = ("mpad", "stages")
# Run by every command but changing nothing a stage computes: the console-script entry and package markers.
IGNORED = {"stages/cli.py"}


def module_file(name: str) -> Path | None:
    """Repo file of a dotted module name (a package gives its __init__.py), or None outside the repo."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[Path]:
    """Repo files that `path` imports anywhere in its body (and the packages on the way)."""
    found: set[Path] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]))
                if file is not None:
                    found.add(file)
    return found


def closure(start: Path) -> set[str]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imports_of(path) - seen)
    files = {p.relative_to(ROOT).as_posix() for p in seen}
    return {f for f in files if not f.endswith("__init__.py") and f not in IGNORED}


def declared(deps: list[str]) -> tuple[set[str], set[str]]:
    """(python files covered by the deps, the deps that are python files or folders of them)."""
    covered, listed = set(), set()
    for dep in deps:
        path = ROOT / dep
        if path.is_dir() and any(path.glob("*.py")):
            listed.add(dep)
            covered |= {p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")}
        elif dep.endswith(".py"):
            listed.add(dep)
            covered.add(dep)
    return covered, listed


@pytest.mark.parametrize("stage", sorted(DVC))
def test_deps_are_the_import_closure(stage):
    spec = DVC[stage]
    command = spec["cmd"].split()[1]
    used = closure(ROOT / "stages" / f"{command}.py")
    covered, listed = declared(spec["deps"])
    repeated = sorted({dep for dep in spec["deps"] if spec["deps"].count(dep) > 1})
    assert repeated == [], f"{stage}: listed more than once in deps"
    assert sorted(used - covered) == [], f"{stage}: imported but not in deps"
    unused = {dep for dep in listed if not (used & (declared([dep])[0]))}
    assert sorted(unused) == [], f"{stage}: in deps but not imported"
    needs_configs = "mpad/clip.py" in used
    assert needs_configs == ("mpad/model_configs" in spec["deps"]), f"{stage}: mpad/model_configs (read by clip.py)"
