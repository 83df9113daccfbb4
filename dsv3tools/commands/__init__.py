"""CLI commands: each module parses options, calls one library function and prints the result."""
