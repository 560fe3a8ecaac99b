"""A crawl through every prep stage: URL block list, language, decontamination, dedup and PII,
each removal counted under its own reason."""

import io
import json

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from common.errors import UserError
from data.filters.decontamination import Decontamination
from data.prepare import prepare
from data.text import TextView

ITALIAN = ("Quel ramo del lago di Como, che volge a mezzogiorno, tra due catene non interrotte di monti, tutto a "
           "seni e a golfi, a seconda dello sporgere e del rientrare di quelli, vien quasi a un tratto a "
           "ristringersi, e a prender corso e figura di fiume, tra un promontorio a destra, e un'ampia costiera "
           "dall'altra parte; e il ponte, che ivi congiunge le due rive, par che renda ancor più sensibile all'occhio "
           "questa trasformazione, e segni il punto in cui il lago cessa, e l'Adda rincomincia.")
EVAL_ANSWER = "the lighthouse keeper counted forty seven ships passing the northern rocks before the storm broke"


def stories(examples, n):
    blocks = [b for b in (examples / "pretrain_tinystories_valid_head.txt").read_text().split("\n\n") if len(b) > 400]
    return blocks[:n]


def page(title, paragraphs):
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (f"<html><head><title>{title}</title></head><body><nav>Home | News | Subscribe to our newsletter</nav>"
            f"<article><h1>{title}</h1>{body}</article><footer>Copyright 2026</footer></body></html>")


@pytest.fixture
def crawl(tmp_path, examples):
    a, b, c, d = stories(examples, 4)
    near = a.replace(" the ", " a ", 2)
    pages = {
        "https://one.example/a": page("A story", [a, b]),
        "https://two.example/copy": page("A story", [a, b]),  # the same text again
        "https://three.example/near": page("A story", [near, b]),  # a near duplicate
        "https://quattro.example/it": page("Il lago", [ITALIAN, ITALIAN.replace("Como", "Lecco")]),
        "https://five.example/contact": page("Contact", [c, "Write to jane.doe@mail.example for a copy."]),
        "https://six.example/quiz": page("Quiz", [d, f"And so {EVAL_ANSWER}."]),
        "https://ads.blocked.example/x": page("Ads", [b, c]),
    }
    warc = tmp_path / "crawl.warc.gz"
    with warc.open("wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, html in pages.items():
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html.encode()),
                                                          http_headers=headers))
    evals = tmp_path / "evalset.jsonl"
    items = [{"question": "What did the keeper count?", "answer": EVAL_ANSWER},
             {"ctx": "A man", "endings": ["sat.", "ran far away from the dog"], "label": 1}]
    evals.write_text("".join(json.dumps(item) + "\n" for item in items))
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("# ad servers\nblocked.example\nnews.example/private/\n")
    return warc, evals, blocklist


def test_each_page_is_kept_or_removed_for_its_reason(crawl, tmp_path):
    warc, evals, blocklist = crawl
    report = prepare([warc], tmp_path / "out", filters="none", dedup="exact,minhash", languages=["en"],
                     decontaminate=[evals], url_blocklist=blocklist, pii=True)
    docs = [json.loads(line) for line in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    assert [d["url"] for d in docs] == ["https://one.example/a", "https://five.example/contact"]
    assert report["removed"] == {"url_blocklist:domain": 1, "language:it": 1, "decontaminated:evalset": 1,
                                 "exact_duplicate": 1, "near_duplicate": 1}
    assert "jane.doe@mail.example" not in docs[1]["text"] and report["pii_redacted"]["email"] == 1
    assert report["languages"] == {"keep": ["en"], "threshold": 0.65}
    assert report["examples"]["decontaminated:evalset"][0]["id"]


def test_decontamination_finds_answers_and_question_answer_straddles_only(tmp_path):
    evals = tmp_path / "e.jsonl"
    evals.write_text(json.dumps({"question": "one two three four", "answer": "five six seven eight"}) + "\n")
    decon = Decontamination([evals], ngram=4)
    assert decon(TextView("x five six seven eight y")) == "e"  # the answer itself
    assert decon(TextView("three four five six")) == "e"  # across question and answer
    assert decon(TextView("One, two! Three four")) is None  # the question alone (datatrove's default)
    assert decon(TextView("five six seven nine")) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"languages": ["english"]}, "unknown language code"),
    ({"decontaminate": ["missing.jsonl"]}, "no such evaluation file"),
    ({"url_blocklist": "missing.txt"}, "no such URL block list"),
])
def test_bad_stage_arguments_are_one_line_and_write_nothing(crawl, tmp_path, kwargs, message):
    warc, _, _ = crawl
    with pytest.raises(UserError, match=message):
        prepare([warc], tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()
