"""Paths of the shipped task files the recipe tests read."""

from pathlib import Path

DATA = Path(__file__).parents[2] / "examples" / "data"
SMS = DATA / "cls_sms_spam_collection.tsv"
SCAN_TRAIN = DATA / "seq2seq_scan_simple_train_quarter.txt"
SCAN_TEST = DATA / "seq2seq_scan_simple_test_quarter.txt"
