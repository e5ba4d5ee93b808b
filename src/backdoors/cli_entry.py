"""`python -m backdoors.cli_entry` runs the CLI (for tests and for environments without the scripts)."""

from .cli import main

main()
