"""The GPU benchmark script itself runs (tiny shapes, CPU) and reports every row it promises."""

import json

import pytest

pytest.importorskip("transformers")
from bench import gpu_train


@pytest.mark.slow
def test_smoke_writes_json_with_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--workloads", "tiny-llama,tiny-t5,tiny-moe", "--modes", "tessera,hf", "--json", str(out)]
    assert gpu_train.main(argv) == 0
    report = json.loads(out.read_text())
    rows = {(r["workload"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(w, m) for w in ("tiny-llama", "tiny-t5", "tiny-moe") for m in ("tessera", "hf")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["loss"] == pytest.approx(row["loss"])  # finite
    assert rows[("tiny-llama", "tessera")]["vs_best_hf"] == pytest.approx(
        rows[("tiny-llama", "tessera")]["tokens_per_s"] / rows[("tiny-llama", "hf")]["tokens_per_s"])
    assert "tiny-t5" in capsys.readouterr().out


def test_rows_past_the_budget_are_skipped_and_still_reported(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--workloads", "tiny-bert", "--modes", "tessera,hf", "--budget-s", "0", "--json", str(out)]
    assert gpu_train.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["skipped"]) for r in rows] == [("tessera", "past --budget-s 0"), ("hf", "past --budget-s 0")]


def test_an_unknown_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_train.main(["--smoke", "--modes", "tessera,fast"])
    assert "unknown mode 'fast'" in capsys.readouterr().err


def test_the_multi_gpu_rows_are_skipped_on_cpu_saying_why(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--workloads", "tiny-llama,tiny-moe", "--modes", "tessera-tp,tessera-ep", "--json", str(out)]
    assert gpu_train.main(argv) == 0
    rows = {(r["workload"], r["mode"]): r.get("skipped") for r in json.loads(out.read_text())["rows"]}
    assert rows == {
        ("tiny-llama", "tessera-tp"): "parallel.tp needs 2+ CUDA GPUs (one process each); this machine has 0",
        ("tiny-llama", "tessera-ep"): "ep splits an MoE decoder's experts",
        ("tiny-moe", "tessera-tp"): "tp splits dense decoder blocks",
        ("tiny-moe", "tessera-ep"): "parallel.ep needs 2+ CUDA GPUs (one process each); this machine has 0",
    }


@pytest.mark.slow
@pytest.mark.parametrize(("workload", "mode"), [("tiny-llama", "tessera-tp"), ("tiny-moe", "tessera-ep")])
def test_the_multi_gpu_rows_run_the_real_strategies_on_two_cpu_ranks(workload, mode, monkeypatch):
    """The rows' own code on 2 gloo ranks (what a GPU machine runs with NCCL) follows its 1-process run
    (plain ddp): every rank reads the same batch."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    table = gpu_train.SMOKE_WORKLOADS[workload]
    split, whole = (gpu_train.time_parallel(table, mode, size=n, steps=2, warmup=1, timeout_s=240) for n in (2, 1))
    assert split["gpus"] == 2 and split["tokens_per_s"] > 0
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)  # after 3 updates
