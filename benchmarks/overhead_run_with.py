"""Run a module or a script against another checkout of st3 (e.g. main before a change), for before/after runs.

    .venv/bin/python benchmarks/overhead_run_with.py TREE -m st3.cli bench ...
    .venv/bin/python benchmarks/overhead_run_with.py TREE st3/bench/overhead.py --clock thread

The project's editable install puts a finder ahead of `sys.path` that would import this tree whatever
PYTHONPATH says; it is dropped from `sys.meta_path` for this process only, and TREE goes first on the path.
"""

import runpy
import sys


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    tree, rest = sys.argv[1], sys.argv[2:]
    sys.meta_path = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
    sys.path.insert(0, tree)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
