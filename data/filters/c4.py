"""C4's line and document rules (Raffel et al. 2020), datatrove's defaults except
``filter_no_terminal_punct=False`` (as in the FineWeb recipe; the C4 original drops every line
without terminal punctuation). Kept lines replace the document's text."""

from __future__ import annotations

import dataclasses
import re
import unicodedata

from data.text import TERMINAL_PUNCTUATION, TextView, split_words

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


@dataclasses.dataclass
class C4Filter:
    name = "c4"
    remove_citations: bool = True
    filter_no_terminal_punct: bool = False
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    def __call__(self, doc: TextView) -> str | None:
        sentences = 0
        kept = []
        for line in doc.lines:
            line = line.strip()
            words = line.split()
            if 0 <= self.max_word_length < len(line) and max(map(len, words)) > self.max_word_length:
                continue
            if self.remove_citations and "[" in line:  # every citation mark starts with one
                line = CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < self.min_words_per_line:
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return "lorem_ipsum"
            if self.filter_javascript and "javascript" in lower:
                continue
            if self.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if self.filter_policy and any(p in lower for p in POLICY):
                continue
            if sentences < self.min_num_sentences:  # past the minimum the count no longer matters
                sentences += count_sentences(line)
            kept.append(line)
        if sentences < self.min_num_sentences:
            return "too_few_sentences"
        text = "\n".join(kept).strip()
        if text != doc.text:
            doc.replace_text(text)
        return None


def count_sentences(line: str) -> int:
    """Sentences in a line as spaCy's sentencizer (datatrove's) counts them: a new one starts at the first
    token that is not punctuation after a token that is a sentence-ending mark (so "Mr." or "..." end none)."""
    count, ended = 1, False
    for token in split_words(line):
        if token in TERMINAL_PUNCTUATION:
            ended = True
        elif ended and not all(unicodedata.category(c).startswith("P") for c in token):
            count, ended = count + 1, False
    return count
