"""``python -m adapruner.cli`` (e.g. under ``accelerate launch``)."""

from . import main

main()
