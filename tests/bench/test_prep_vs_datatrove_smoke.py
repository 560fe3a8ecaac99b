"""The whole-prep bench runs Tessera and datatrove on a few pages and compares their decisions."""

import json

import pytest

from bench import prep_vs_datatrove

for peer in ("datatrove", "spacy", "cchardet", "magic", "resiliparse"):  # the dev extra's peers
    pytest.importorskip(peer)


@pytest.mark.slow
def test_smoke_times_both_sides_and_compares_their_decisions(tmp_path):
    out = tmp_path / "prep.json"
    results = prep_vs_datatrove.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text())["agreement"] == results["agreement"]
    for side in results["speed"].values():
        assert side["mb_per_core_s"] > 0 and len(side["cpu_s"]) == 1
    filters = results["agreement"]["filters"]
    assert filters["pages"] == results["pages"] and 0 < filters["kept_datatrove"] < filters["pages"]
    assert results["agreement"]["near duplicates removed"]["datatrove"] >= 1  # the pages include near copies
