"""`make demo`: the whole pipeline on the shipped corpora, on CPU, in minutes.

Stages run in order and each prints what it produced; stages whose code does not exist yet are
reported as skipped, so the demo grows with the project.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("tessera demo: the pipeline stages land issue by issue; nothing to run yet.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
