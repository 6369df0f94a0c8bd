"""Orchestration: the units of work of runs, sweeps and ablations, and the backends that run them."""
