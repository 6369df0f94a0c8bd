"""Thin Typer commands, one module a DVC stage: read params, do the I/O, call `mpad`."""
