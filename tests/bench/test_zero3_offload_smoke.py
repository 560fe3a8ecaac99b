"""The ZeRO-3 + offload size probe: its ladder trains tiny sizes on CPU, stops where it must, and its
watchdog ends a child that outgrows the host RAM or its time."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
from bench import zero3_offload


@pytest.mark.slow
def test_smoke_ladder_trains_each_size(tmp_path, capsys):
    out = tmp_path / "zero3.json"
    assert zero3_offload.main(["--smoke", "--json", str(out), "--log-dir", str(tmp_path / "logs")]) == 0
    report = json.loads(out.read_text())
    rows = {r["size"]: r for r in report["rows"]}
    assert list(rows) == ["tiny", "tiny-2x"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["optimizer_fused"] is True  # offloaded states: torch's fused AdamW on the CPU
        first, second = row["losses"]
        assert second < first  # the first step's update reached the weights
        assert row["tokens_per_s"] == pytest.approx(64 / row["step_s"])
        assert 0 < row["host_rss_peak_gib"] < report["host_ram_gib"]
    assert rows["tiny-2x"]["params"] > rows["tiny"]["params"]
    assert report["largest_ok"] == {"size": "tiny-2x", "params": rows["tiny-2x"]["params"]}
    assert "largest that trained: tiny-2x" in capsys.readouterr().out


def test_ladder_stops_at_the_host_ram_estimate(tmp_path):
    out = tmp_path / "zero3.json"
    assert zero3_offload.main(["--smoke", "--host-ram-gib", "1", "--json", str(out), "--log-dir", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["status"].startswith("skipped: host RAM estimate 3 > 1 GiB")
    assert rows[1]["status"] == "not run: tiny does not fit the host RAM"


def test_ladder_stops_when_the_budget_is_spent(tmp_path):
    out = tmp_path / "zero3.json"
    assert zero3_offload.main(["--smoke", "--budget-s", "10", "--json", str(out), "--log-dir", str(tmp_path)]) == 0
    first, second = [r["status"] for r in json.loads(out.read_text())["rows"]]
    assert first.startswith("not run: ") and first.endswith(" s of the budget left")
    assert second == "not run: budget spent"


def test_unknown_size_is_one_line(capsys):
    with pytest.raises(SystemExit):
        zero3_offload.main(["--smoke", "--sizes", "tiny,huge"])
    assert "unknown size 'huge'; choose from tiny, tiny-2x" in capsys.readouterr().err


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_watchdog_kills_a_child_over_the_host_limit():
    proc = _child("import time; block = bytearray(400 * 2**20); time.sleep(30)")
    outcome = zero3_offload.watch(proc, host_limit_bytes=200 * 2**20, timeout_s=20, poll_s=0.05)
    assert outcome.killed_for == "host-RAM OOM"
    assert outcome.returncode == -9
    assert outcome.host_rss_peak_bytes > 200 * 2**20


def test_watchdog_kills_a_child_out_of_time():
    proc = _child("import time; time.sleep(30)")
    outcome = zero3_offload.watch(proc, host_limit_bytes=2**40, timeout_s=0.5, poll_s=0.05)
    assert (outcome.killed_for, outcome.returncode) == ("timeout", -9)


def test_watchdog_reports_a_clean_exit():
    outcome = zero3_offload.watch(_child("import sys; sys.exit(3)"), host_limit_bytes=2**40, timeout_s=20)
    assert (outcome.killed_for, outcome.returncode) == (None, 3)
