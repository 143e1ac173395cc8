"""Command-line entry points. The CLI only parses options and wires the stages together."""
