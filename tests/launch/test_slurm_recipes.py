"""configs/slurm/*.sh: each recipe renders a valid sbatch script (its node × GPU counts fit its batch sizes)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launching import child_env

REPO = Path(__file__).parents[2]
RECIPES = sorted((REPO / "configs" / "slurm").glob("*.sh"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_renders(recipe, tmp_path):
    script = tmp_path / "job.sbatch"
    env = child_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(recipe), "--log-dir", str(tmp_path / "logs"), "--out", str(script)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    nodes, gpus = re.search(r"--nodes (\d+) --gpus-per-node (\d+)", recipe.read_text()).groups()
    assert f"#SBATCH --nodes={nodes}\n" in text
    assert (f"#SBATCH --gpus-per-node={gpus}\n" in text) == (gpus != "0")
