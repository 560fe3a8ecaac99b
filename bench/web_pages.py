"""Web pages with a known main text, built deterministically from the shipped corpora (for the benches).

There is no real HTML corpus in ../shared/data, so each page wraps one article (a Wikipedia article, a
C4 web text, or a TinyStories story from examples/data) in boilerplate of the kinds crawls are full of:
header, navigation menu, breadcrumbs, cookie banner, share buttons, author line, ads, newsletter box,
related-links and most-read lists, tags, a comment section, footer, scripts, styles and JSON-LD, in one
of four layouts (HTML5 semantic, div soup, a table layout, a WordPress-like blog). The ground truth is
the article's text; every piece of boilerplate text is recorded, by kind, so an extraction can be
scored for what it lost (recall) and what it let through (precision, leaks). Some articles come back on
a second page in another layout (exact duplicates of the text) or with one paragraph changed (near
duplicates), so dedup has something to find.
"""

from __future__ import annotations

import html
import io
import itertools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data.readers import iter_documents

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
WIKI_PARAGRAPH = re.compile(r"(?<=[a-z0-9)\]\"][.!?])(?=[A-Z])")  # the dump glues paragraphs: "socialism.Humans"
WORD = re.compile(r"\w+")
LAYOUTS = ("html5", "divs", "table", "blog")

SECTIONS = ["Home", "News", "World", "Politics", "Business", "Technology", "Science", "Health", "Sports",
            "Culture", "Opinion", "Travel", "Food", "Video", "Podcasts", "About", "Contact"]
SITES = ["The Daily Ledger", "Northwind Review", "Open Atlas Magazine", "Riverside Post", "Brightline Journal",
         "Kestrel Times", "Harbor & Hill", "Quarterly Lantern"]
AUTHORS = ["Maria Okafor", "James Lindqvist", "Priya Raman", "Tomás Ferreira", "Helen Wu", "Daniel Mbeki"]
COMMENTERS = ["sunny_day42", "Rob K.", "marcusT", "Anna", "oldtimer", "curious_reader", "Jo B", "phil.m"]
COMMENTS = [
    "Great article, thanks for sharing this with us.", "I have been saying this for years and nobody listens.",
    "Does anyone know where I can find the original source for this?", "This is exactly what I needed today.",
    "Not sure I agree with the second half, but an interesting read overall.", "Bookmarked for later, cheers!",
    "My grandmother used to tell us the very same thing when we were kids.", "Can you write a follow up on this?",
    "First time commenting here, long time reader. Keep up the good work.", "Well said. Sharing with my family.",
    "The comments section is always the best part of this site, honestly.", "Source? This sounds made up to me.",
]
ADS = ["Sponsored: Refinance today and save up to 40% on your monthly payments. Check your rate in 2 minutes.",
       "Advertisement: The one kitchen gadget chefs don't want you to know about. Shop the sale now.",
       "Promoted: Learn a new language in just 15 minutes a day. Start your free trial.",
       "Sponsored content: Top rated travel insurance plans compared side by side."]
SHARES = ["Share on Facebook", "Share on X", "Share on LinkedIn", "Email this article", "Copy link", "Print"]
FOOTER_LINKS = ["About us", "Careers", "Advertise with us", "Privacy Policy", "Terms of Use", "Cookie settings",
                "Accessibility", "Contact the newsroom", "Sitemap", "RSS feeds"]
SCRIPT = ("window.dataLayer = window.dataLayer || []; function gtag(){dataLayer.push(arguments);} "
          "gtag('js', new Date()); gtag('config', 'G-TRACKER42'); "
          "var adSlots = {top: 'div-gpt-ad-1', side: 'div-gpt-ad-2'};")
STYLE = ("body{font-family:Georgia,serif;margin:0} .nav-menu li{display:inline-block;padding:4px 8px} "
         ".ad-slot{min-height:250px;background:#f4f4f4} .cookie-banner{position:fixed;bottom:0;width:100%}")


@dataclass
class Page:
    """One page: its address, its HTML, the article text (the truth) and its boilerplate by kind."""

    url: str
    html: str
    article: str
    layout: str
    boilerplate: dict[str, list[str]] = field(default_factory=dict)
    copy_of: int | None = None  # the page whose article this one repeats (exactly or nearly)


def articles(max_per_source: int | None = None) -> list[tuple[str, str, list[str]]]:
    """(source, title, paragraphs) of the shipped English articles: Wikipedia, C4 web text, TinyStories."""
    out = []
    for line in (EXAMPLES / "pretrain_wikipedia_demo.txt").read_text().splitlines()[:max_per_source]:
        paragraphs = [p.strip() for p in WIKI_PARAGRAPH.split(line) if p.strip()]
        out.append(("wikipedia", " ".join(line.split()[:3]).strip(",.;("), paragraphs))
    for line in (EXAMPLES / "pretrain_c4_demo.jsonl").read_text().splitlines()[:max_per_source]:
        paragraphs = [p.strip() for p in json.loads(line)["text"].split("\n") if p.strip()]
        out.append(("c4", " ".join(paragraphs[0].split()[:6]), paragraphs))
    stories = iter_documents([EXAMPLES / "pretrain_tinystories_valid_head.txt"], txt_mode="passage")
    for story in itertools.islice(stories, 150 if max_per_source is None else max_per_source):
        paragraphs = [p.strip() for p in story.text.split("\n") if p.strip()]
        out.append(("stories", " ".join(paragraphs[0].split()[:5]), paragraphs))
    return out


def build_pages(max_per_source: int | None = None, seed: int = 0, copies: float = 0.05) -> list[Page]:
    """One page per article, plus a second page for a ``copies`` share of them (half exact, half near
    duplicates: one paragraph changed), each in a layout and with boilerplate drawn from ``seed``."""
    rng = random.Random(seed)
    pages = []
    source = articles(max_per_source)
    for index, (kind, title, paragraphs) in enumerate(source):
        pages.append(_page(rng, f"https://{kind}.example/{index}", title, paragraphs, source))
    for n, index in enumerate(sorted(rng.sample(range(len(source)), max(1, int(copies * len(source)))))):
        _, title, paragraphs = source[index]
        paragraphs = list(paragraphs)
        if n % 2 and len(paragraphs) > 3:
            paragraphs[1] = "This paragraph was rewritten for the second edition of the page."
        page = _page(rng, f"https://mirror.example/{index}", title, paragraphs, source)
        page.copy_of = index
        pages.append(page)
    return pages


def _page(rng: random.Random, url: str, title: str, paragraphs: list[str],
          source: list[tuple[str, str, list[str]]]) -> Page:
    layout = rng.choice(LAYOUTS)
    site = rng.choice(SITES)
    parts: dict[str, list[str]] = {}

    def bp(kind: str, text: str) -> str:
        parts.setdefault(kind, []).append(text)
        return html.escape(text)

    links = rng.sample(SECTIONS, rng.randint(5, 12))
    nav = "".join(f'<li><a href="/{s.lower()}">{bp("nav", s)}</a></li>' for s in links)
    header = (f'<a class="logo" href="/"><img src="/logo.svg" alt="{html.escape(site)} logo"></a>'
              f'<span class="site-name">{bp("header", site)}</span> '
              f'<span class="tagline">{bp("header", "Independent reporting since 1998")}</span>')
    crumbs = f'{bp("breadcrumb", "Home")} &rsaquo; <a href="/s">{bp("breadcrumb", rng.choice(SECTIONS))}</a>'
    byline = bp("byline", f"By {rng.choice(AUTHORS)} | Published {rng.randint(1, 28)} March 2026 | "
                          f"{rng.randint(2, 12)} min read")
    share = "".join(f'<a class="share" href="#">{bp("share", s)}</a>' for s in rng.sample(SHARES, rng.randint(2, 5)))
    cookie = bp("cookie", "We use cookies to improve your experience and to show you personalised ads. "
                          "By continuing to browse you agree to our use of cookies.")
    cookie_html = (f'<div class="cookie-banner" id="consent"><p>{cookie}</p><button>{bp("cookie", "Accept all")}'
                   f'</button><button>{bp("cookie", "Manage preferences")}</button></div>')
    ad = f'<div class="ad-slot"><span>{bp("ad", rng.choice(ADS))}</span><iframe src="/ads/1"></iframe></div>'
    others = rng.sample(source, min(6, len(source)))
    related = "".join(f'<li><a href="/r/{i}">{bp("related", f"{t}: what you need to know")}</a></li>'
                      for i, (_, t, _) in enumerate(others[:rng.randint(3, 6)]))
    popular = "".join(f"<li><a href='/p/{i}'>{bp('popular', f'Why {t} matters more than ever')}</a></li>"
                      for i, (_, t, _) in enumerate(others[3:]))
    newsletter = (f'<form class="newsletter"><h3>{bp("newsletter", "Subscribe to our newsletter")}</h3>'
                  f'<p>{bp("newsletter", "Get the best stories delivered to your inbox every morning.")}</p>'
                  f'<input type="email" placeholder="Your email"><button>{bp("newsletter", "Sign up")}</button></form>')
    tags = ", ".join(f'<a rel="tag" href="/t/{i}">{bp("tags", w)}</a>'
                     for i, w in enumerate(rng.sample(["analysis", "explainer", "long read", "history",
                                                       "society", "environment", "family"], 3)))
    comments = "".join(
        f'<li class="comment"><div class="comment-author">{bp("comments", rng.choice(COMMENTERS))}</div>'
        f'<div class="comment-body"><p>{bp("comments", " ".join(rng.sample(COMMENTS, rng.randint(1, 3))))}</p>'
        f'</div><a class="reply" href="#">{bp("comments", "Reply")}</a></li>' for _ in range(rng.randint(0, 6)))
    comments_html = (f'<section id="comments" class="comments-area"><h3>{bp("comments", "Join the discussion")}</h3>'
                     f'<ol class="comment-list">{comments}</ol></section>') if comments else ""
    footer = " | ".join(f'<a href="/f{i}">{bp("footer", s)}</a>' for i, s in enumerate(rng.sample(FOOTER_LINKS, 6)))
    footer += f'<p>{bp("footer", f"© 2026 {site}. All rights reserved.")}</p>'
    head = (f"<head><meta charset=\"utf-8\"><title>{html.escape(title)} | {html.escape(site)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script><script type=\"application/ld+json\">"
            f'{{"@type": "NewsArticle", "publisher": "{html.escape(site)}"}}</script></head>')
    parts.setdefault("script", []).append(SCRIPT[:60])
    body = "".join(f"<p>{_inline(rng, p)}</p>" for p in paragraphs)
    h1 = f"<h1>{html.escape(title)}</h1>"
    top_ad, side = (ad if rng.random() < 0.7 else ""), rng.random() < 0.6
    if layout == "html5":
        page = (f"<header>{header}<nav class='nav-menu'><ul>{nav}</ul></nav></header>"
                f"<main><nav class='breadcrumb'>{crumbs}</nav>{top_ad}<article>{h1}<div class='byline'>{byline}</div>"
                f"<div class='share-bar'>{share}</div>{body}<footer class='tags'>{tags}</footer></article>"
                + (f"<aside><h3>{bp('related', 'Related articles')}</h3><ul>{related}</ul>{newsletter}</aside>"
                   if side else "") + f"{comments_html}</main><footer>{footer}</footer>{cookie_html}")
    elif layout == "divs":
        page = (f"<div id='wrapper'>{cookie_html}<div class='top-bar'>{header}</div><div class='menu'><ul>{nav}"
                f"</ul></div><div class='crumbs'>{crumbs}</div><div class='content-area'><div class='post'>{h1}"
                f"<div class='meta'>{byline}</div>{top_ad}<div class='post-body'>{body}</div><div class='social'>"
                f"{share}</div></div>" + (f"<div class='sidebar'><h4>{bp('popular', 'Most read')}</h4><ol>{popular}"
                                          f"</ol>{ad}</div>" if side else "")
                + f"<div class='related'><ul>{related}</ul></div>{comments_html}</div>"
                f"<div class='footer'>{footer}</div></div>")
    elif layout == "table":
        page = (f"<table width='100%'><tr><td colspan='2' class='header'>{header}</td></tr><tr><td class='nav' "
                f"width='180' valign='top'><ul>{nav}</ul>{top_ad}</td><td class='main' valign='top'>{h1}"
                f"<p class='byline'>{byline}</p>{body}<p>{tags}</p>{comments_html}</td></tr><tr><td colspan='2' "
                f"class='footer'>{footer}</td></tr></table>")
    else:
        page = (f"<div class='site'><header class='site-header'>{header}<nav class='main-navigation'><ul>{nav}</ul>"
                f"</nav></header><div class='site-content'><article class='post hentry'><header class='entry-header'>"
                f"{h1}<div class='entry-meta'>{byline}</div></header><div class='entry-content'>{body}</div>"
                f"<footer class='entry-footer'>{tags}<div class='sharedaddy'>{share}</div></footer></article>"
                f"<nav class='post-navigation'><ul>{related}</ul></nav>{comments_html}</div>"
                + (f"<aside class='widget-area'>{newsletter}{ad}</aside>" if side else "")
                + f"<footer class='site-footer'>{footer}</footer></div>{cookie_html}")
    document = f"<!DOCTYPE html><html lang='en'>{head}<body>{page}</body></html>"
    return Page(url, document, "\n".join(paragraphs), layout, parts)


def _inline(rng: random.Random, paragraph: str) -> str:
    """The paragraph escaped, with a link or emphasis around a few of its words now and then."""
    words = html.escape(paragraph).split(" ")
    if len(words) > 8 and rng.random() < 0.3:
        at = rng.randrange(len(words) - 3)
        tag = rng.choice([("<a href='/wiki/x'>", "</a>"), ("<strong>", "</strong>"), ("<em>", "</em>")])
        words[at], words[at + 2] = tag[0] + words[at], words[at + 2] + tag[1]
    return " ".join(words)


def words(text: str) -> Counter[str]:
    """The bag of lower-cased words that scoring compares."""
    return Counter(WORD.findall(text.lower()))


def score(page: Page, extracted: str) -> dict[str, float | int]:
    """Word-level precision, recall and F1 of ``extracted`` against the article, and which boilerplate
    pieces of at least two words leaked into it (matched as whole word sequences)."""
    truth, got = words(page.article), words(extracted)
    common = sum((truth & got).values())
    precision = common / sum(got.values()) if got else 0.0
    recall = common / sum(truth.values()) if truth else 0.0
    flat = " " + " ".join(WORD.findall(extracted.lower())) + " "
    pieces = [(kind, " ".join(WORD.findall(text.lower()))) for kind, texts in page.boilerplate.items()
              for text in texts]
    pieces = [(kind, p) for kind, p in pieces if p.count(" ") >= 1]
    leaked = Counter(kind for kind, p in pieces if f" {p} " in flat)
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "pieces": len(pieces), "leaked": sum(leaked.values()), **{f"leaked_{k}": v for k, v in leaked.items()}}


def write_warc(pages: list[Page], path: Path) -> None:
    """The pages as HTTP 200 text/html response records of a gzipped WARC, in order (with the payload type
    header that Common Crawl's WARCs carry)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with path.open("wb") as f:
        writer = WARCWriter(f, gzip=True)
        for page in pages:
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                page.url, "response", payload=io.BytesIO(page.html.encode()), http_headers=headers,
                warc_headers_dict={"WARC-Identified-Payload-Type": "text/html"}))
