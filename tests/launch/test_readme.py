"""README promises: the generated config reference is current, and its commands exist."""

import re
from pathlib import Path

from launch.cli import COMMANDS
from launch.config_reference import BEGIN, END, render_block

README = Path(__file__).resolve().parents[2] / "README.md"


def test_config_reference_is_current():
    text = README.read_text()
    current = text[text.index(BEGIN): text.index(END) + len(END)]
    assert current == render_block(), "run: python -m launch.config_reference --write README.md"


def test_readme_names_only_real_commands():
    used = set(re.findall(r"^\s*tessera (\w+)", README.read_text(), flags=re.MULTILINE))
    assert used and used <= set(COMMANDS), used - set(COMMANDS)
