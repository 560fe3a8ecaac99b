from spawn import spawn

from runs import tiny_config, train


def test_single_process_pretrain_runs(corpus, tmp_path):
    [result] = spawn(train, 1, tiny_config(corpus, tmp_path, "train.max_steps=4"))
    assert result.steps == 4
