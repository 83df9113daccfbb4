"""``python -m dsv3tools`` runs the CLI."""

from dsv3tools.cli import main

main()
