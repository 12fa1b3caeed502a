"""The package's rooms import only from rooms below them (top-level and in-function imports alike), so the
data flow stays one way: a room that reaches up (e.g. ``models`` importing ``assets``) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "adapruner"

# Bottom to top. Rooms on one line may not import each other; each may import every room on a line above.
LAYERS = [
    ("errors", "paths"),
    ("files", "util", "methods"),
    ("models",),
    ("data",),
    ("importance",),
    ("pruning",),
    ("local",),
    ("evaluation",),  # perplexity and divergence are the search's objective
    ("recipe",),
    ("search", "recovery", "export"),
    ("assets", "stages"),
    ("api",),
    ("pipeline",),
    ("cli", "__init__"),
]
LEVEL = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}


def _room(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_rooms(path: Path) -> set[str]:
    """The package's rooms that ``path`` imports, at any depth of the module."""
    package = list(path.relative_to(PACKAGE.parent).parent.parts)  # e.g. ["adapruner", "recipe"]
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("adapruner"):
                target = node.module.split(".")
            else:
                continue
            names = target[1:2] or [alias.name for alias in node.names]  # `from . import api` names the room
            rooms |= {name for name in names if name in LEVEL}
        elif isinstance(node, ast.Import):
            rooms |= {a.name.split(".")[1] for a in node.names if a.name.startswith("adapruner.")} & set(LEVEL)
    return rooms


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_room_has_a_layer():
    assert {_room(path) for path in MODULES} <= set(LEVEL), "add the new room to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_from_a_room_above(path):
    room = _room(path)
    upward = sorted(other for other in _imported_rooms(path) - {room} if LEVEL[other] >= LEVEL[room])
    assert not upward, f"{path.relative_to(PACKAGE)} ({room}) imports {upward}, which are not below it"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The parser finds relative, absolute and in-function imports (so the test above can fail)."""
    module = PACKAGE / "models" / "__layering_probe__.py"
    source = "from ..assets import fetch\n\ndef f():\n    from adapruner.cli import app\n    from .. import api\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert _imported_rooms(module) == {"assets", "cli", "api"}
