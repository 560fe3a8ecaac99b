import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from common.errors import UserError
from data.prepare import prepare
from data.readers import iter_documents

ARTICLE = ("The river town of Elmsford rebuilt its stone bridge in the spring, after the winter floods had "
           "carried away two of the old arches. Engineers from the county worked with local masons for "
           "eleven weeks, and the new span reuses most of the original granite blocks. ") * 3
BOILERPLATE = "Home | About us | Contact | Subscribe to our newsletter | Cookie settings"


def records(n: int = 40) -> list[dict]:
    return [{"id": f"r{i}", "text": f"Record {i} says: " + ARTICLE.replace("eleven", f"{i} long"), "lang": "en"}
            for i in range(n)]


def documents(out) -> str:
    return (out / "documents.jsonl").read_text()


def test_parquet_and_zstd_give_the_same_documents_as_jsonl(tmp_path):
    rows = records()
    jsonl = tmp_path / "twin.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    zst = tmp_path / "twin.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(jsonl.read_bytes()))
    parquet = tmp_path / "twin.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=7)  # several row groups
    expected = prepare([jsonl], tmp_path / "from_jsonl", filters="none", dedup="exact")
    assert expected["documents_out"] == len(rows)
    for source in (zst, parquet):
        report = prepare([source], tmp_path / "out" / source.name, filters="none", dedup="exact")
        assert documents(tmp_path / "out" / source.name) == documents(tmp_path / "from_jsonl")
        assert report["documents_in"] == len(rows)


def test_parquet_without_the_text_column_names_the_file_and_its_columns(tmp_path):
    parquet = tmp_path / "web.parquet"
    pq.write_table(pa.Table.from_pylist([{"content": "x", "url": "u"}]), parquet)
    with pytest.raises(UserError, match=r"web\.parquet: no text column 'text' \(columns: content, url\)"):
        list(iter_documents([parquet]))
    assert [d.text for d in iter_documents([parquet], text_field="content")] == ["x"]


def write_warc(path, *, truncate_last: bool) -> None:
    with path.open("wb") as f:
        writer = WARCWriter(f, gzip=True)

        def response(url: str, status: str, mime: str, body: bytes) -> None:
            headers = StatusAndHeaders(status, [("Content-Type", mime)], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                          http_headers=headers))

        page = (f"<html><head><title>Bridge</title></head><body><nav>{BOILERPLATE}</nav>"
                f"<article><h1>Bridge rebuilt</h1><p>{ARTICLE}</p></article>"
                f"<footer>{BOILERPLATE} | Copyright 2026</footer></body></html>")
        response("https://news.example/bridge", "200 OK", "text/html; charset=utf-8", page.encode())
        response("https://news.example/logo.png", "200 OK", "image/png", b"\x89PNG" + bytes(300))
        response("https://news.example/gone", "404 Not Found", "text/html", b"<html><p>Not found</p></html>")
        response("https://news.example/cut", "200 OK", "text/html", page.replace("Bridge", "Cut").encode())
    if truncate_last:
        path.write_bytes(path.read_bytes()[:-200])


def test_warc_keeps_the_main_text_of_html_200_and_counts_the_rest(tmp_path):
    warc = tmp_path / "crawl.warc.gz"
    write_warc(warc, truncate_last=True)
    report = prepare([warc], tmp_path / "out", filters="none", dedup="none")
    docs = [json.loads(line) for line in documents(tmp_path / "out").splitlines()]
    assert [d["url"] for d in docs] == ["https://news.example/bridge"]
    assert "stone bridge" in docs[0]["text"] and "Subscribe to our newsletter" not in docs[0]["text"]
    assert report["skipped"] == {"warc_not_html": 1, "warc_status_not_200": 1, "warc_truncated": 1}
    assert report["documents_in"] == 1


def test_warc_pages_are_decoded_in_the_charset_they_declare(tmp_path):
    """HTTP header first, then <meta charset>, then UTF-8; Latin-1 read as windows-1252 (curly quotes)."""
    russian = "Мост через реку отстроили весной после зимнего наводнения. " * 12
    french = "Le pont de pierre a été reconstruit au printemps “après” les crues de l’hiver. " * 12
    pages = [
        ("https://a.example/ru", "text/html; charset=windows-1251", russian, "cp1251", ""),
        ("https://a.example/fr", "text/html", french, "cp1252", '<meta charset="iso-8859-1">'),
        ("https://a.example/utf", "text/html; charset=no-such-codec", french, "utf-8", ""),
    ]
    warc = tmp_path / "charsets.warc"
    with warc.open("wb") as f:
        writer = WARCWriter(f, gzip=False)
        for url, mime, text, codec, meta in pages:
            body = f"<html><head>{meta}<title>t</title></head><body><article><p>{text}</p></article></body></html>"
            headers = StatusAndHeaders("200 OK", [("Content-Type", mime)], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body.encode(codec)),
                                                          http_headers=headers))
    docs = list(iter_documents([warc]))
    assert [d.meta["url"] for d in docs] == [url for url, *_ in pages]
    for doc, (_, _, text, _, _) in zip(docs, pages, strict=True):
        assert text.split()[:8] == doc.text.split()[:8] and "\ufffd" not in doc.text


def blog_page(byline: str = "") -> str:
    """A blog post in a theme's markup: menu, article (``byline`` under the heading), share bar, comment
    section, footer."""
    comments = "".join(f"<li class='comment'><div class='comment-author'>reader{i}</div><div class='comment-body'>"
                       f"<p>Totally agree, my cousin Wilbur saw the very same barges in {1990 + i}.</p></div></li>"
                       for i in range(4))
    return ("<html><body><div class='site'><header class='site-header'><nav><ul><li>Home</li><li>News</li></ul>"
            f"</nav></header><article class='post'><h1>Bridge</h1>{byline}<div class='entry-content'>"
            + "".join(f"<p>{p}</p>" for p in BLOG_PARAGRAPHS)
            + "</div><div class='sharedaddy'><a>Share on Facebook</a></div></article>"
            f"<section id='comments' class='comments-area'><h3>Join the discussion</h3><ol class='comment-list'>"
            f"{comments}</ol></section><footer>{BOILERPLATE}</footer></div></body></html>")


BLOG_PARAGRAPHS = [ARTICLE, "Traffic returned to the bridge in June, and the market moved back to the square."]


def write_page_warc(path, pages: dict[str, str]) -> None:
    """A gzipped WARC of HTTP 200 text/html responses: url → page."""
    with path.open("wb") as f:
        writer = WARCWriter(f, gzip=True)
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        for url, page in pages.items():
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(page.encode()),
                                                          http_headers=headers))


def test_warc_main_text_leaves_out_comments_and_page_furniture(tmp_path):
    """A blog page: the article's words all come through; the comment section (trafilatura keeps it by
    default), menu, share bar and footer do not (FineWeb's extraction settings)."""
    warc = tmp_path / "blog.warc.gz"
    write_page_warc(warc, {"https://blog.example/bridge": blog_page()})
    [doc] = iter_documents([warc])
    assert doc.text.split() == ["Bridge", *" ".join(BLOG_PARAGRAPHS).split()]  # the heading, then the article
    assert "Wilbur" not in doc.text and "Share on Facebook" not in doc.text and "Subscribe" not in doc.text


@pytest.mark.parametrize("extractor", ["trafilatura", "resiliparse"])
def test_each_extractor_keeps_the_article_and_drops_the_furniture_it_should(tmp_path, extractor):
    """Both keep the heading and every word of the article and drop the menu, share bar, comments and
    footer; the byline is where they differ (bench/html_extraction.py: resiliparse leaks bylines, trafilatura
    with precision favoured leaves them out). The report names the extractor."""
    byline = "By Ada Stone, 3 June 2026"
    warc = tmp_path / "blog.warc.gz"
    write_page_warc(warc, {"https://blog.example/bridge": blog_page(f"<p class='byline'>{byline}</p>")})
    report = prepare([warc], tmp_path / "out", filters="none", dedup="none", extractor=extractor)
    [doc] = [json.loads(line) for line in documents(tmp_path / "out").splitlines()]
    kept_byline = byline.split() if extractor == "resiliparse" else []
    assert doc["text"].split() == ["Bridge", *kept_byline, *" ".join(BLOG_PARAGRAPHS).split()]
    assert doc["url"] == "https://blog.example/bridge"
    assert report["extractor"] == extractor


def test_the_extractor_is_recorded_only_when_a_warc_is_read(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records(3)))
    report = prepare([jsonl], tmp_path / "out", filters="none", dedup="none", extractor="resiliparse")
    assert report["extractor"] is None
    with pytest.raises(UserError, match=r"^unknown extractor 'lxml'; choose from trafilatura, resiliparse$"):
        prepare([jsonl], tmp_path / "never", extractor="lxml")
    assert not (tmp_path / "never").exists()
