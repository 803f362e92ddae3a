"""``python -m scope.cli``: the `scope` command."""

from scope.cli import main

main()
