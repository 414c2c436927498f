"""Benchmarks: each module has run(quick) -> dict and prints its JSON when run as a script."""
