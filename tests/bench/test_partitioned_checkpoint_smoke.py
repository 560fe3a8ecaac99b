"""The tensor-parallel checkpoint bench runs both ways (own pieces, gathered whole), ddp and fsdp, on 2 CPU ranks."""

import json

import pytest

from bench import partitioned_checkpoint


@pytest.mark.slow
def test_smoke_measures_every_setting(tmp_path, capsys):
    out = tmp_path / "checkpoint.json"
    assert partitioned_checkpoint.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["strategy"], r["mode"]) for r in rows] == [(s, m) for s in partitioned_checkpoint.STRATEGIES
                                                        for m in partitioned_checkpoint.MODES]
    assert all(r["written_gib"] > 0 and r["save_s"] > 0 and r["load_s"] > 0 for r in rows)
    assert "gathered" in capsys.readouterr().out
