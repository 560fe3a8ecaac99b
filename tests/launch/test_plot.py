import json

import pytest

from launch.cli import main


def test_plot_writes_pngs(tmp_path):
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 1000.0 + s} for s in range(1, 11)]
    rows.append({"step": 10, "eval/loss": 4.2})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["plot", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["loss.png", "lr.png", "tokens_per_s.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_plot_draws_online_reward_and_kl(tmp_path):
    rows = [{"step": s, "loss": 0.01, "reward": 0.1 * s, "kl": 0.01 * s, "time/rollout_s": 0.2,
             "time/training_s": 0.1} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["plot", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["kl.png", "loss.png", "reward.png",
                                                                     "rollout_time.png"]


@pytest.mark.parametrize("content", [None, "not json\n"])
def test_plot_bad_run_dir_is_one_line(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tessera plot: error:") and "\n" not in err
