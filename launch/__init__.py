"""Entry points and cluster glue: the `tessera` CLI, launchers, SLURM rendering.

``python -m launch.pretrain`` (as torchrun, deepspeed and srun run it) puts the directory it was
started from first on ``sys.path``, so a user's own ``model.py`` or ``data.py`` there would be
imported instead of Tessera's packages. Importing ``launch`` first puts Tessera's root ahead of it,
and refuses in one line if such a module was already imported.
"""

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
PACKAGES = ("common", "data", "model", "trainer")


def _own_packages_first() -> None:
    for name in PACKAGES:
        origin = getattr(sys.modules.get(name), "__file__", None) or ""
        if name in sys.modules and not origin.startswith(ROOT + os.sep):
            print(f"tessera: error: {origin or name!r} was imported as {name!r}, hiding Tessera's {name} package; "
                  "rename it or launch from another directory", file=sys.stderr)
            raise SystemExit(2)
    if sys.path[:1] != [ROOT]:
        sys.path.insert(0, ROOT)


_own_packages_first()
