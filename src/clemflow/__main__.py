"""`python -m clemflow` is the same as the `clemflow` command."""

from .cli import main

main()
