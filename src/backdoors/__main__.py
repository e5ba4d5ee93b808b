"""`python -m backdoors ...` runs the `backdoors` command (where its script is not installed;
the lab starts its agents this way: `python -m backdoors agent --config FILE`)."""

from .cli import main

main()
