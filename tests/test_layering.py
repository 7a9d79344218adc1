"""The package layers: every import of another mergelab package points down.

``LAYERS`` lists the packages (and top-level modules) from the bottom up; a module may import packages of a
strictly lower layer only (its own package aside). Imports inside functions count too: a lazy import that runs
back up a layer is still a cycle in the design. docs/design.md describes the same order.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mergelab"

# Bottom up. Packages in one layer may not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "options"),
    ("data",),
    ("evaluation", "models", "structure"),
    ("batchnorm",),  # BatchNorm statistics from data (update_bn); used by train/ and merge/
    ("io", "match", "train"),
    ("merge",),
    ("analysis",),
    ("report",),
    ("mergelab",),  # the public API: src/mergelab/__init__.py
    ("experiments",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _package(module: str) -> str:
    """``mergelab.match.zip`` → ``match``; ``mergelab`` → ``mergelab``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out.append((module, path))
    return out


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m == "mergelab" or m.startswith("mergelab.")}


def test_every_package_has_a_layer() -> None:
    packages = {_package(m) for m, _ in _modules()}
    assert packages - set(RANK) == set(), "give the new package a layer in tests/test_layering.py and docs"


def test_imports_point_down() -> None:
    upward = []
    for module, path in _modules():
        own = _package(module)
        for target in sorted(_imports(path)):
            if _package(target) != own and RANK.get(_package(target), -1) >= RANK.get(own, -1):
                upward.append(
                    f"{module} (layer {RANK.get(own)}) imports {target} (layer {RANK.get(_package(target))})"
                )
    assert not upward, "imports from the same layer or above:\n" + "\n".join(upward)


def test_match_and_structure_stay_below_merge_and_the_zoo() -> None:
    """The two edges this order was made to cut: match/ → merge/ and structure/ → models/."""
    for module, path in _modules():
        if _package(module) in ("match", "structure"):
            assert not {t for t in _imports(path) if _package(t) == "merge"}, module
        if _package(module) == "structure":
            assert not {t for t in _imports(path) if _package(t) in ("models", "match", "experiments")}, (
                module
            )
