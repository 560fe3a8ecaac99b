import gzip
import itertools
import json
import random

import pytest

from common.errors import UserError
from data.dedup import MinHashDedup, simplify
from data.prepare import prepare
from data.readers import PASSAGE_WORDS, iter_documents, resolve_txt_mode

VOCAB = ["".join(p) for p in itertools.product(["ba", "ke", "mi", "lo", "su", "ta", "re", "no", "pi", "du"], repeat=3)]


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = simplify(text).split()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_planted_duplicates_are_found_and_distinct_documents_kept(tmp_path):
    rng = random.Random(3)
    base = [" ".join(rng.choices(VOCAB, k=300)) for _ in range(120)]
    records = [{"id": f"doc{i}", "text": t} for i, t in enumerate(base)]
    near_pairs = []
    for i in range(100):
        words = base[i].split()
        for _ in range(rng.randint(1, 6)):  # a few scattered edits: Jaccard ~0.75-0.97
            words[rng.randrange(len(words))] = rng.choice(VOCAB)
        near = " ".join(words)
        near_pairs.append((f"near{i}", jaccard(base[i], near), simplify(near) == simplify(base[i])))
        records.append({"id": f"near{i}", "text": near})
    for i in range(30):  # exact copies up to case, punctuation and spacing
        records.append({"id": f"exact{i}", "text": "  " + base[i].upper().replace(" ", " ,  ", 5) + "!"})
    rng.shuffle(records[120:])
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = prepare([src], tmp_path / "out", filters="none", dedup="exact,minhash")

    kept = {json.loads(line)["id"] for line in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()}
    assert {f"doc{i}" for i in range(120)} <= kept  # every distinct document survives
    assert not any(k.startswith("exact") for k in kept)
    similar = [name for name, j, _ in near_pairs if j >= 0.8]
    recall = sum(name not in kept for name in similar) / len(similar)
    assert len(similar) >= 50 and recall >= 0.9
    identical = sum(same for _, _, same in near_pairs)  # an edit may put back the same word
    assert report["removed"]["exact_duplicate"] == 30 + identical
    assert report["removed"]["near_duplicate"] == len([n for n, _, _ in near_pairs if n not in kept]) - identical
    assert report["documents_out"] == len(kept)
    assert report["examples"]["exact_duplicate"][0]["id"].startswith(("exact", "near"))


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    a = " ".join(rng.choices(VOCAB, k=400))
    words = a.split()
    for i in range(0, 400, 40):
        words[i] = "changed"
    b = " ".join(words)
    m = MinHashDedup(bands=32, rows=8)
    estimate = (m.signature(a) == m.signature(b)).mean()
    assert abs(estimate - jaccard(a, b)) < 0.08


def test_prepare_reads_every_format_and_reports(tmp_path, examples):
    gz = tmp_path / "c4.jsonl.gz"
    gz.write_bytes(gzip.compress((examples / "pretrain_c4_demo.jsonl").read_bytes()))
    story = tmp_path / "stories.txt"
    story.write_text("\n\n".join((examples / "pretrain_tinystories_valid_head.txt").read_text().split("\n\n")[:200]))
    report = prepare([gz, story], tmp_path / "out", txt_mode="block")
    assert report["txt_modes"] == {str(story): "block"}
    assert report["documents_in"] == 300 + 200
    assert 0 < report["documents_out"] < report["documents_in"]
    assert sum(report["removed"].values()) == report["documents_in"] - report["documents_out"]
    assert report["removed"]["gopher_quality:gopher_short_doc"] > 0
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["documents_out"] == report["documents_out"]
    docs = [json.loads(line) for line in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    assert len(docs) == report["documents_out"] and all(d["text"] and d["id"] for d in docs)
    assert {d["id"].split(":")[0] for d in docs} == {"c4.jsonl.gz", "stories.txt"}


def test_reader_modes_and_errors(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one\ntwo\n\n\nthree\n")
    assert [d.text for d in iter_documents([txt], txt_mode="block")] == ["one\ntwo\n", "three\n"]
    assert [d.text for d in iter_documents([txt])] == ["one\ntwo\n\nthree\n"]  # auto: one short passage
    assert [d.text for d in iter_documents([txt], txt_mode="line")] == ["one\n", "two\n", "three\n"]
    assert len(list(iter_documents([txt], txt_mode="file"))) == 1
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"no text field .text.*--text-field"):
        list(iter_documents([bad]))
    assert [d.text for d in iter_documents([bad], text_field="body")] == ["x"]
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        list(iter_documents([tmp_path / "c.csv"]))
    with pytest.raises(UserError, match="unknown dedup"):
        prepare([txt], tmp_path / "o", dedup="fuzzy")


def test_auto_txt_mode_reads_lines_passages_or_chapters_by_what_the_file_holds(examples, tmp_path):
    wiki = examples / "pretrain_wikipedia_demo.txt"
    assert resolve_txt_mode(wiki, "auto") == "line" and len(list(iter_documents([wiki]))) == 30  # an article a line

    stories = examples / "pretrain_tinystories_valid_head.txt"  # stories' paragraphs, blank lines between all
    passages, blocks = list(iter_documents([stories])), list(iter_documents([stories], txt_mode="block"))
    assert resolve_txt_mode(stories, "auto") == "passage"
    assert "\n".join(d.text for d in passages) == "\n".join(d.text for d in blocks)  # nothing lost, order kept
    words = [len(d.text.split()) for d in passages]
    assert min(words) >= PASSAGE_WORDS and len(passages) < len(blocks) / 4

    rng = random.Random(0)
    prose = [" ".join(rng.choices(VOCAB, k=40)) + "." for _ in range(12)]
    book = tmp_path / "book.txt"
    book.write_text("A PREFACE\n\n" + prose[0] + "\n\nBOOK ONE: 1805\n\n\nCHAPTER I\n\n" + "\n\n".join(prose[1:6])
                    + "\n\nCHAPTER II\n\n" + "\n\n".join(prose[6:9]) + "\n\nChapter 3. The end\n\n"
                    + "\n\n".join(prose[9:]) + "\nCHAPTER and verse were quoted, a line of running text.\n")
    chapters = list(iter_documents([book]))
    assert resolve_txt_mode(book, "auto") == "chapter"
    firsts = ["A PREFACE", "BOOK ONE: 1805", "CHAPTER II", "Chapter 3. The end"]
    assert [d.text.split("\n")[0] for d in chapters] == firsts
    assert chapters[1].text.startswith("BOOK ONE: 1805\n\nCHAPTER I\n\n" + prose[1])  # the headings open one chapter
    assert chapters[-1].text.endswith("a line of running text.\n")  # a heading word inside a block is text
    report = prepare([book, wiki], tmp_path / "out", filters="none", dedup="none")
    assert report["txt_modes"] == {str(book): "chapter", str(wiki): "line"} and report["documents_out"] == 4 + 30


def test_hard_wrapped_paragraphs_are_read_as_the_lines_they_are(examples, tmp_path):
    """Gutenberg wraps its books at ~70 characters; FineWeb's line-punctuation rule then read each piece as a
    line and removed 9 of War and Peace's 84 chapters (none now). Verse, whose lines do not fill a width,
    stays as written."""
    book = examples / "pretrain_war_and_peace_books_1_4.txt"
    chapters = list(iter_documents([book]))
    raw = book.read_text()
    assert "".join(d.text for d in chapters).split() == raw.split()  # only line breaks inside paragraphs go
    paragraphs = [p for d in chapters for p in d.text.split("\n") if p.strip()]
    assert len(paragraphs) == len([b for b in raw.split("\n\n") if b.strip()])  # a paragraph is one line
    report = prepare([book], tmp_path / "out", dedup="none")
    assert "fineweb:line_punct_ratio" not in report["removed"] and report["documents_in"] == 84

    verse = examples / "pretrain_tinyshakespeare.txt"
    as_written = [b.strip("\n") + "\n" for b in verse.read_text().split("\n\n") if b.strip()]
    assert [d.text for d in iter_documents([verse], txt_mode="block")] == as_written


def test_missing_input_writes_nothing(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        prepare([tmp_path / "missing.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
