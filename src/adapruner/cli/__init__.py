"""``adapruner`` command line: a thin layer over :mod:`adapruner.api`, one module per group of commands."""

from . import prune as _prune_commands
from . import recover as _recover_commands
from . import results as _results_commands  # noqa: F401 - registers evaluate, compare, export, info
from . import search as _search_commands
from .app import app

# the command functions under their command names (tests read their signatures)
prune = _prune_commands.prune
importance = _prune_commands.importance
search = _search_commands.search
finetune = _recover_commands.finetune


def main() -> None:
    app()


__all__ = ["app", "finetune", "importance", "main", "prune", "search"]
