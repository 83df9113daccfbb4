"""The one exception type that means "bad input or usage" (exit code 2 at the CLI)."""


class DSV3Error(Exception):
    """Bad input or usage: the CLI prints the one-line message and exits 2."""
