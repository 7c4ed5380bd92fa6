"""Monarch benchmark: the same as ``python -m lowrank.bench --only monarch``; other arguments pass through
(``--device``, ``--quick``, ``--out``)."""
import sys

from lowrank.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--only", "monarch", *sys.argv[1:]]))
