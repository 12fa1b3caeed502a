"""Small shared helpers: one place for user-facing status lines."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False)


def log(message: str) -> None:
    """A status line on stderr, so stdout stays clean for tables and JSON."""
    console.print(f"[dim]adapruner[/dim] {message}")
