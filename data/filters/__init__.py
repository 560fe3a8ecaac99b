"""Quality filters with datatrove's default thresholds, over a shared :class:`data.text.TextView`.

A filter is called with the document's view and returns ``None`` to keep it or a short reason
(``"gopher_short_doc"``) to remove it; a line filter (C4) may rewrite the view's text. ``build``
turns ``--filters gopher,c4,fineweb`` into filter instances, in datatrove's FineWeb order.
"""

from __future__ import annotations

from typing import Protocol

from common.errors import UserError
from data.text import TextView


class Filter(Protocol):
    name: str

    def __call__(self, doc: TextView) -> str | None: ...


ORDER = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
ALIASES = {"gopher": ("gopher_repetition", "gopher_quality")}


def build(spec: str | list[str]) -> list[Filter]:
    """Filters named by a comma list (``gopher`` means both Gopher filters; ``none`` means none)."""
    from data.filters.c4 import C4Filter
    from data.filters.fineweb import FineWebFilter
    from data.filters.gopher_quality import GopherQualityFilter
    from data.filters.gopher_repetition import GopherRepetitionFilter

    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if names == ["none"]:
        return []
    chosen: set[str] = set()
    for name in names:
        if name not in ORDER and name not in ALIASES:
            raise UserError(f"unknown filter {name!r}; choose from {', '.join([*ALIASES, *ORDER])} or none")
        chosen.update(ALIASES.get(name, (name,)))
    classes = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
               "c4": C4Filter, "fineweb": FineWebFilter}
    return [classes[name]() for name in ORDER if name in chosen]
