"""URL block list, as FineWeb's URL filter uses one: a document whose ``url`` field is on the list is removed.

The list is a text file, one entry a line (``#`` starts a comment): a domain (``example.com``
blocks it and its subdomains) or a URL prefix without the scheme (``example.org/ads/``).
Documents without a ``url`` pass.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from common.errors import UserError


class URLBlocklist:
    name = "url_blocklist"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no such URL block list: {path}")
        entries = [line.split("#", 1)[0].strip().lower() for line in path.read_text(encoding="utf-8").splitlines()]
        entries = [e.removeprefix("https://").removeprefix("http://") for e in entries if e]
        if not entries:
            raise UserError(f"{path}: the URL block list is empty")
        self.domains = {e for e in entries if "/" not in e}
        self.prefixes = tuple(e for e in entries if "/" in e)

    def __call__(self, url: str | None) -> str | None:
        if not url:
            return None
        host = (urlsplit(url if "//" in url else f"//{url}").hostname or "").lower()
        parts = host.split(".")
        if any(".".join(parts[i:]) in self.domains for i in range(len(parts))):
            return "domain"
        bare = url.lower().split("//", 1)[-1]
        return "url" if bare.startswith(self.prefixes) else None
