"""The host-memory bench of building and sharding a model runs every setting on 2 CPU ranks."""

import json

import pytest

pytest.importorskip("deepspeed")
from bench import init_host_memory


@pytest.mark.slow
def test_smoke_measures_every_setting(tmp_path, capsys):
    out = tmp_path / "init.json"
    assert init_host_memory.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["strategy"], r["mode"]) for r in rows] == init_host_memory.SETTINGS
    assert len({r["params"] for r in rows}) == 1 and rows[0]["params"] > 0
    assert all(r["peak_gib"] >= r["held_gib"] >= 0 for r in rows)
    assert "blockwise" in capsys.readouterr().out
