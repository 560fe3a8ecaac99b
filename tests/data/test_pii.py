import json
from collections import Counter

from data.pii import redact
from data.prepare import prepare


def test_redact_replaces_emails_and_public_ipv4_only():
    counts: Counter[str] = Counter()
    text = "Mail jane.doe+news@mail.example.org or ops@corp.co.uk; server 8.8.4.4, router 192.168.1.1, v1.2.3.4.5"
    out = redact(text, counts)
    assert out == ("Mail email@example.com or email@example.com; server 22.214.171.124, router 192.168.1.1, "
                   "v1.2.3.4.5")
    assert counts == {"email": 2, "ipv4": 1}


def test_prep_pii_counts_in_report(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"id": "a", "text": "Write to bob@example.net from 81.2.69.160 today."},
            {"id": "b", "text": "Nothing here."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare([src], tmp_path / "out", filters="none", dedup="none", pii=True)
    docs = [json.loads(line)["text"] for line in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    assert docs == ["Write to email@example.com from 22.214.171.124 today.", "Nothing here."]
    assert report["pii_redacted"] == {"email": 1, "ipv4": 1}
    assert prepare([src], tmp_path / "plain", filters="none", dedup="none")["pii_redacted"] is None
