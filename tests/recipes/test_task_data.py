"""data.tasks: the SMS (label<TAB>text) and SCAN (IN: ... OUT: ...) parsers, and their shards."""

from __future__ import annotations

from collections import Counter

import pytest
from recipe_data import SCAN_TEST, SCAN_TRAIN, SMS

from common.errors import UserError
from data.shard_set import ShardSet, Source
from data.shards import ShardManifest
from data.tasks import label_list, manifest_labels, read_classification, read_seq2seq


def test_sms_file_parses_into_its_documented_label_counts():
    examples = list(read_classification(SMS))
    assert len(examples) == 5574
    assert Counter(e.label for e in examples) == {"ham": 4827, "spam": 747}
    first_line = SMS.read_text().splitlines()[0]
    assert examples[0].text == first_line.split("\t", 1)[1].strip()


def test_scan_files_parse_into_command_action_pairs():
    train, test = list(read_seq2seq(SCAN_TRAIN)), list(read_seq2seq(SCAN_TEST))
    assert (len(train), len(test)) == (4182, 1046)
    line = SCAN_TRAIN.read_text().splitlines()[0]
    assert f"IN: {train[0].source} OUT: {train[0].target}" == line
    actions = {a for pair in train for a in pair.target.split()}
    assert actions == {"I_WALK", "I_RUN", "I_JUMP", "I_LOOK", "I_TURN_LEFT", "I_TURN_RIGHT"}


@pytest.mark.parametrize(("reader", "bad"), [
    (read_classification, "ham\tfine\nno tab on this line\n"),
    (read_classification, "ham\tfine\nspam\t  \n"),
    (read_seq2seq, "IN: walk OUT: I_WALK\nIN: walk I_WALK\n"),
    (read_seq2seq, "IN: walk OUT: I_WALK\nOUT: I_WALK IN: walk\n"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, reader, bad):
    path = tmp_path / "bad.txt"
    path.write_text("\n" + bad)  # a leading blank line: line numbers count it
    with pytest.raises(UserError, match=rf"^{path}:3: expected") as info:
        list(reader(path))
    assert "\n" not in str(info.value)


def test_label_order_is_sorted_or_given_and_unknown_labels_fail():
    examples = list(read_classification(SMS))[:50]
    assert label_list(examples) == ["ham", "spam"]
    assert label_list(examples, ["spam", "ham"]) == ["spam", "ham"]
    with pytest.raises(UserError, match="'spam' is not in --labels ham"):
        label_list(examples, ["ham"])


def test_classification_shards_hold_bos_text_eos_and_label_index(tmp_path, task_tokenizer, small_files):
    from data.make_shards import make_shards

    sms, _ = small_files
    make_shards([str(sms)], task_tokenizer.path, tmp_path / "cls", kind="classification",
                labels=["spam", "ham"], max_len=16)
    assert manifest_labels(tmp_path / "cls") == ["spam", "ham"]
    shards = ShardSet([Source(str(tmp_path / "cls"))])
    examples = list(read_classification(sms))
    assert shards.num_samples == len(examples) == 40
    for i, example in enumerate(examples):
        ids = shards.read(i, 0).tolist()
        expected = [task_tokenizer.bos_id, *task_tokenizer.encode(example.text)[:14], task_tokenizer.eos_id]
        assert ids == expected
        assert int(shards.read(i, 1)[0]) == ["spam", "ham"].index(example.label)
    assert ShardManifest.load(tmp_path / "cls").num_tokens == sum(len(shards.read(i, 0)) for i in range(40))


def test_seq2seq_shards_end_source_and_target_with_eos(tmp_path, task_tokenizer, small_files):
    from data.make_shards import make_shards

    _, scan = small_files
    make_shards([str(scan)], task_tokenizer.path, tmp_path / "s2s", kind="seq2seq")
    shards = ShardSet([Source(str(tmp_path / "s2s"))])
    for i, pair in enumerate(read_seq2seq(scan)):
        assert shards.read(i, 0).tolist() == [*task_tokenizer.encode(pair.source), task_tokenizer.eos_id]
        target = shards.read(i, 1)
        assert task_tokenizer.decode(target[:-1].tolist()) == pair.target and target[-1] == task_tokenizer.eos_id
    with pytest.raises(UserError, match="holds seq2seq shards; classification needs"):
        manifest_labels(tmp_path / "s2s")


def test_shard_command_reports_a_bad_line_in_one_line(tmp_path, task_tokenizer, capsys):
    from launch.cli import main

    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\tok\nspam only\n")
    code = main(["shard", str(bad), "--tokenizer", str(task_tokenizer.path), "--out", str(tmp_path / "o"),
                 "--kind", "classification", "--workers", "1"])
    assert code == 2
    assert capsys.readouterr().err == f"tessera shard: error: {bad}:2: expected 'label<TAB>text', got 'spam only'\n"
    assert not (tmp_path / "o" / "manifest.json").exists()
