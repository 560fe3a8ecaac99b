"""The extraction bench runs on a few pages and scores what each extractor keeps and leaks."""

import json

import pytest

from bench import html_extraction
from bench.web_pages import build_pages, score

pytest.importorskip("resiliparse")  # the dev extra's peer


def test_smoke_scores_every_extractor_and_the_cli(tmp_path):
    out = tmp_path / "extraction.json"
    report = html_extraction.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text())["results"].keys() == report["results"].keys()
    results = report["results"]
    assert results["trafilatura CLI"]["same_text_as_tessera"] == 1.0  # the CLI with the same settings, same texts
    for name, r in results.items():
        assert r["mb_per_core_s"] > 0, name
        if "f1" in r:
            assert r["recall"] > 0.9 and r["pages_lost"] == 0, name
    # trafilatura's defaults keep the comment section; Tessera's call (FineWeb's settings) does not
    assert results["trafilatura, defaults (comments kept)"]["leaks_by_kind"].get("comments", 0) > 0
    assert "comments" not in results[html_extraction.TESSERA]["leaks_by_kind"]


def test_score_counts_lost_words_and_leaked_boilerplate():
    page = build_pages(max_per_source=1)[0]
    assert score(page, page.article) == {**score(page, page.article), "precision": 1.0, "recall": 1.0, "leaked": 0}
    first_half = page.article[: len(page.article) // 2]
    nav = page.boilerplate["nav"][0] + " " + page.boilerplate["footer"][-1]
    half = score(page, first_half + "\n" + nav)
    assert 0.4 < half["recall"] < 0.6 and half["precision"] < 1.0 and half["leaked_footer"] == 1
