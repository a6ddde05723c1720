"""`python -m st3 ...` runs the command-line tool (the same as `st3 ...`)."""

from st3.cli import app

app()
