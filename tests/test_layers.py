"""Imports point down the layers (docs/design.md, "Layers"), lazy imports inside functions too.

The core imports nothing of mixpipe above it; the loader adapters import neither the trainer nor
the benchmarks. Read from the source with ``ast``, so nothing is imported to check it.
"""
from __future__ import annotations

import ast
import gc
from pathlib import Path
from typing import List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mixpipe"
ADAPTERS = ("torch", "dali", "ffcv")

#: layer -> the mixpipe packages it must not import
FORBIDDEN = {"core": {"train", "bench", "server", "torch", "dali", "ffcv", "data"},
             **{adapter: {"train", "bench"} for adapter in ADAPTERS}}

def _parse(source: str) -> ast.AST:
    """``ast.parse`` with the garbage collector held off: CPython 3.11 raises "AST constructor
    recursion depth mismatch" when a collection inside the parser runs a finalizer (numba's
    dispatcher finalizers, left by the FFCV tests, are such)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if was_enabled:
            gc.enable()


def imported_packages(source: str, module: str) -> Set[str]:
    """The mixpipe sub-packages that ``source``, the text of ``module`` (dotted), imports:
    absolute or relative, at module level or inside functions."""
    parts = module.split(".")
    found: Set[str] = set()
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[:len(parts) - node.level]
                names = [".".join(base + node.module.split("."))] if node.module else \
                    [".".join(base + [alias.name]) for alias in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            head = name.split(".")
            if head[0] == "mixpipe" and len(head) > 1:
                found.add(head[1])
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def cases() -> List:
    out = []
    for layer in FORBIDDEN:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            out.append(pytest.param(layer, path, id=path.relative_to(PACKAGE).as_posix()))
    return out


@pytest.mark.parametrize("layer, path", cases())
def test_imports_point_down(layer: str, path: Path) -> None:
    wrong = imported_packages(path.read_text(), module_name(path)) & FORBIDDEN[layer]
    assert not wrong, f"mixpipe/{path.relative_to(PACKAGE)} imports {sorted(wrong)}"


def test_the_checker_sees_relative_absolute_and_lazy_imports() -> None:
    source = """
from ..core.plan import MixPlan
from .. import bench
import mixpipe.data.tree
def later():
    from mixpipe.train import fit
    from ...mixpipe import nothing_above_the_package
"""
    assert imported_packages(source, "mixpipe.dali.example") == {"core", "bench", "data",
                                                                    "train"}
    assert imported_packages("from .plan import MixPlan", "mixpipe.core.example") == {"core"}
