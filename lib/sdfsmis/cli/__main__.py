"""``python -m sdfsmis.cli``: the ``sdfsmis`` command."""

from sdfsmis.cli import main

main()
