"""`python -m stages ARGS` runs the `mpad` console script (for a checkout that is not pip-installed)."""

from stages.cli import app

app(prog_name="mpad")
