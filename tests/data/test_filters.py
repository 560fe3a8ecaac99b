"""Each filter rule on both sides of its threshold (datatrove's defaults), with crafted documents.

``kept`` documents must not be removed by the rule under test: they are kept, or removed by a rule
that is checked after it (so the rule itself was passed)."""

import itertools
import random

import pytest

from data import filters
from data.filters.c4 import C4Filter, count_sentences
from data.filters.fineweb import FineWebFilter
from data.filters.gopher_quality import GopherQualityFilter
from data.filters.gopher_repetition import GopherRepetitionFilter
from data.text import TextView, normalize

SYLLABLES = ["ba", "ke", "mi", "lo", "su", "ta", "re", "no", "pi", "du", "ga", "ve"]
VOCAB = ["".join(p) for p in itertools.product(SYLLABLES, repeat=3)]  # 1,728 six-letter words
QUALITY_ORDER = ["gopher_short_doc", "gopher_long_doc", "gopher_below_avg_threshold", "gopher_above_avg_threshold",
                 "gopher_too_many_hashes", "gopher_too_many_ellipsis", "gopher_too_many_bullets",
                 "gopher_too_many_end_ellipsis", "gopher_below_alpha_threshold", "gopher_enough_stop_words"]
REPETITION_ORDER = ["dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac", "top_2_gram",
                    "top_3_gram", "top_4_gram", *(f"duplicated_{n}_n_grams" for n in range(5, 11))]
FINEWEB_ORDER = ["line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio"]


def words(n: int, seed: int = 0) -> list[str]:
    return random.Random(seed).sample(VOCAB, n)


def sentence(n: int, seed: int) -> str:
    return "The " + " ".join(words(n - 2, seed)) + " and done."


def verdict(f, text: str) -> str | None:
    return f(TextView(text))


def passes(order: list[str], rule: str, reason: str | None) -> bool:
    return reason is None or order.index(reason) > order.index(rule)


def quality_cases():
    rng_words = words(200, 1)
    body = lambda n, extra="": " ".join(rng_words[: n - 2]) + " the and" + extra  # noqa: E731
    lines = lambda prefix, k, end: "\n".join(  # noqa: E731
        f"{prefix}the and " + " ".join(words(6, i)) + (end if i < k else ".") for i in range(10))
    return [
        ("gopher_short_doc", body(49), body(50)),
        ("gopher_long_doc", " ".join(itertools.islice(itertools.cycle(VOCAB), 100_001)) + " the and",
         " ".join(itertools.islice(itertools.cycle(VOCAB), 99_998)) + " the and"),
        ("gopher_below_avg_threshold", " ".join(["ab"] * 48) + " the and", " ".join(["abc"] * 48) + " the and"),
        ("gopher_above_avg_threshold", " ".join(["abcdefghijk"] * 48) + " the and",
         " ".join(["abcdefghij"] * 48) + " the and"),
        ("gopher_too_many_hashes", body(60) + " #" * 7, body(60) + " #" * 6),
        ("gopher_too_many_ellipsis", body(60) + " ..." * 7 + " end", body(60) + " ..." * 6 + " end"),
        ("gopher_too_many_bullets", lines("• ", 0, "."), lines("", 0, ".").replace("the and", "• the and", 9)),
        ("gopher_too_many_end_ellipsis", lines("", 4, "..."), lines("", 3, "...")),
        ("gopher_below_alpha_threshold", body(50 - 11) + " 1234" * 11, body(50 - 10) + " 1234" * 10),
        ("gopher_enough_stop_words", " ".join(rng_words[:60]) + " the", " ".join(rng_words[:60]) + " the and"),
    ]


@pytest.mark.parametrize(("rule", "removed", "kept"), quality_cases(), ids=lambda v: v if len(v) < 40 else "")
def test_gopher_quality_rules(rule, removed, kept):
    f = GopherQualityFilter()
    assert verdict(f, removed) == rule
    assert passes(QUALITY_ORDER, rule, verdict(f, kept))


def repetition_cases():
    para = [" ".join(words(12, i)) for i in range(10)]
    long_para = " ".join(words(80, 99))
    line = [" ".join(words(8, 100 + i)) for i in range(10)]
    rand = words(100, 7)

    def sprinkle(gram: str, k: int) -> str:
        out = list(rand)
        for i in range(k):
            out.insert(3 * i + 1, gram)
        return " ".join(out)

    repeat = " ".join(words(40, 55))
    short_repeat = " ".join(words(10, 56))
    return [
        ("dup_para_frac", "\n\n".join(para[:6] + para[:4]), "\n\n".join(para[:7] + para[:3])),
        ("dup_para_char_frac", "\n\n".join([*para[:8], long_para, long_para]),
         "\n\n".join([*para[:8], "tiny", "tiny"])),
        ("dup_line_frac", "\n".join(line[:6] + line[:4]), "\n".join(line[:7] + line[:3])),
        ("dup_line_char_frac", "\n".join([*line[:8], long_para, long_para]), "\n".join([*line[:8], "tiny", "tiny"])),
        ("top_2_gram", sprinkle("zap zop", 30), sprinkle("zap zop", 20)),
        ("top_3_gram", sprinkle("zap zop zup", 18), sprinkle("zap zop zup", 12)),
        ("top_4_gram", sprinkle("zap zop zup zip", 13), sprinkle("zap zop zup zip", 8)),
        ("duplicated_5_n_grams", " ".join([*rand[:60], repeat, *rand[60:], repeat]),
         " ".join([*rand[:60], short_repeat, *rand[60:], short_repeat])),
    ]


@pytest.mark.parametrize(("rule", "removed", "kept"), repetition_cases(), ids=lambda v: v if len(v) < 40 else "")
def test_gopher_repetition_rules(rule, removed, kept):
    f = GopherRepetitionFilter()
    assert verdict(f, removed) == rule
    assert passes(REPETITION_ORDER, rule, verdict(f, kept))


def test_repetition_counts_match_a_plain_reading_of_datatrove():
    """The numpy n-gram path against the string path datatrove uses, on real text."""
    from data.filters.gopher_repetition import find_duplicates  # noqa: F401  (shared with FineWeb)

    text = "the cat sat on the mat and the cat sat on the hat " * 3 + "and then it left"
    doc = TextView(text)
    w = doc.words
    grams = [" ".join(w[i : i + 2]) for i in range(len(w) - 1)]
    top = max(grams, key=grams.count)
    expected_top2 = len(top) * grams.count(top) / len(text)
    f = GopherRepetitionFilter(top_n_grams=((2, expected_top2 - 1e-9),), dup_n_grams=())
    assert verdict(f, text) == "top_2_gram"
    f = GopherRepetitionFilter(top_n_grams=((2, expected_top2 + 1e-9),), dup_n_grams=())
    assert verdict(f, text) is None


def plain_ngram_verdict(f: GopherRepetitionFilter, words: list[str], size: int) -> str | None:
    """The n-gram rules read plainly (tuples of words, Counter, the greedy walk), as datatrove writes them."""
    from collections import Counter

    for n, limit in f.top_n_grams:
        if len(words) < n:
            return None
        grams = list(zip(*(words[i:] for i in range(n))))
        gram, count = Counter(grams).most_common(1)[0]
        if (sum(map(len, gram)) + n - 1) * count / size > limit:
            return f"top_{n}_gram"
    for n, limit in f.dup_n_grams:
        if len(words) < n:
            return None
        grams, seen, total, i = list(zip(*(words[i:] for i in range(n)))), set(), 0, 0
        while i < len(grams):
            if grams[i] in seen:
                total, i = total + sum(map(len, grams[i])), i + n
            else:
                seen.add(grams[i])
                i += 1
        if total / size > limit:
            return f"duplicated_{n}_n_grams"
    return None


def test_ngram_rules_decide_as_the_plain_reading_on_repetitive_text():
    """Many repeats and count ties (a 6-word vocabulary of unequal lengths), thresholds swept so every
    rule decides somewhere: the numpy path gives the plain reading's verdict every time."""
    rng = random.Random(0)
    vocabulary = ["a", "bb", "ccc", "dddd", "the", "x"]
    decided = set()
    for trial in range(400):
        words = [rng.choice(vocabulary[: rng.randint(2, 6)]) for _ in range(rng.randint(2, 80))]
        scales = [0.2, 0.5, 1.0, 2.0, 100.0]  # each rule's default threshold times one of these (100: off)
        f = GopherRepetitionFilter(
            top_n_grams=tuple((n, t * rng.choice(scales[-1:] if trial % 2 else scales))  # odd trials: top rules off
                              for n, t in GopherRepetitionFilter.top_n_grams),
            dup_n_grams=tuple((n, t * rng.choice(scales)) for n, t in GopherRepetitionFilter.dup_n_grams))
        size = len(" ".join(words))
        expected = plain_ngram_verdict(f, words, size)
        assert f._ngram_rules(words, size) == expected, (trial, words)
        decided.add(expected)
    assert len(decided) >= 6  # both rule families and keeps were exercised


def test_covered_characters_bound_the_greedy_count_of_every_larger_n():
    """What lets the n-gram rules stop early: the characters of the words that repeated n-grams cover are
    at least the greedy walk's count for n and for every larger n."""
    import numpy as np

    from data.filters.gopher_repetition import covered_chars, repeated_chars

    rng = random.Random(1)
    for _ in range(300):
        vocabulary = ["a", "bb", "ccc", "dddd", "the", "x"][: rng.randint(2, 6)]
        words = [rng.choice(vocabulary) for _ in range(rng.randint(10, 90))]
        chars = np.concatenate([[0], np.cumsum([len(w) for w in words])])
        counts = {}
        for n in range(2, 11):
            seen: dict[tuple[str, ...], int] = {}  # n-gram → where it first occurs
            starts = [seen.setdefault(tuple(words[i : i + n]), i) for i in range(len(words) - n + 1)]
            first, grams = np.unique(starts, return_inverse=True)
            repeats = np.flatnonzero(first[grams] < np.arange(len(grams)))
            counts[n] = covered_chars(repeats, chars, n), repeated_chars(repeats, grams, first, chars, n)
        assert all(counts[n][0] >= counts[m][1] for n in counts for m in counts if m >= n), (words, counts)


def c4_doc(n_sentences: int, extra: str = "") -> str:
    return "\n".join(sentence(8, i) for i in range(n_sentences)) + extra


@pytest.mark.parametrize(("rule", "removed", "kept"), [
    ("too_few_sentences", c4_doc(4), c4_doc(5)),
    ("lorem_ipsum", c4_doc(6, "\nLorem ipsum dolor sit amet."), c4_doc(6, "\nLorem dolor sit amet.")),
    ("curly_bracket", c4_doc(6, "\nfunction f() { return 1; }"), c4_doc(6, "\nfunction f() ( return 1; )")),
], ids=["too_few_sentences", "lorem_ipsum", "curly_bracket"])
def test_c4_document_rules(rule, removed, kept):
    assert verdict(C4Filter(), removed) == rule
    assert verdict(C4Filter(), kept) is None


def test_c4_line_rules_rewrite_the_text():
    good = [sentence(8, i) for i in range(5)]
    noisy = [*good[:2], "Enable JavaScript to see this page.", "Read our privacy policy here.", "Two words",
             "x" * 1001 + " long word line", good[2] + "[12]", *good[3:], "A line [citation needed] ok."]
    doc = TextView("\n".join(noisy))
    assert C4Filter()(doc) is None
    assert doc.text.split("\n") == [*good, "A line  ok."]
    assert doc.words[0] == "The"  # the cached split follows the new text
    strict = C4Filter(filter_no_terminal_punct=True)
    doc = TextView(c4_doc(5, "\nno terminal punctuation here"))
    assert strict(doc) is None and "no terminal" not in doc.text


def fineweb_lines(n_punct: int = 10, n_short: int = 0, dup: bool = False, tokens_per_line: int = 6) -> str:
    lines = []
    for i in range(10):
        if i < n_short:
            line = "short " + VOCAB[i]
        else:
            line = " ".join(w * 6 for w in words(tokens_per_line, 300 + i))
        lines.append(line + ("." if i < n_punct else ""))
    if dup:
        lines[-1] = lines[-2]
    return "\n".join(lines)


@pytest.mark.parametrize(("rule", "removed", "kept"), [
    ("line_punct_ratio", fineweb_lines(n_punct=1), fineweb_lines(n_punct=2)),
    ("short_line_ratio", fineweb_lines(n_short=7), fineweb_lines(n_short=6)),
    ("char_dup_ratio", fineweb_lines(dup=True), fineweb_lines()),
    ("list_ratio", fineweb_lines(tokens_per_line=1), fineweb_lines(tokens_per_line=3)),
], ids=FINEWEB_ORDER)
def test_fineweb_rules(rule, removed, kept):
    assert verdict(FineWebFilter(), removed) == rule
    assert passes(FINEWEB_ORDER, rule, verdict(FineWebFilter(), kept))


def test_gopher_quality_counts_like_datatrove():
    """Ratios are per token, punctuation included; a stop word counts once however often it occurs."""
    plain = words(60, 3)
    assert verdict(GopherQualityFilter(), " ".join(w + ";" for w in plain) + " the and") == (
        "gopher_below_alpha_threshold")  # half the tokens are semicolons
    assert verdict(GopherQualityFilter(), " ".join(plain) + " the" * 5) == "gopher_enough_stop_words"
    assert verdict(GopherQualityFilter(), " ".join(plain) + " the with") is None


def test_has_letter_counts_what_the_letter_pattern_finds():
    """The isalpha shortcut is exact: every alphabetic code point is one LETTER matches."""
    import sys

    from data.filters.gopher_quality import LETTER, has_letter

    assert all(LETTER.match(c) for c in map(chr, range(sys.maxunicode + 1)) if c.isalpha())
    words = ["word", "42", "x2", "²", "_", "--", "Ⅻ", "½a", "état", "٣", "ﬁ"]
    assert has_letter(words) == sum(bool(LETTER.search(w)) for w in words) == 7  # ² and Ⅻ match, not alphabetic


def test_repetition_lines_skip_blank_lines():
    """Paragraphs apart by blank lines: the blank lines are not repeated lines (datatrove splits at \\n+)."""
    text = "\n\n".join(" ".join(words(8, 100 + i)) for i in range(10))
    assert verdict(GopherRepetitionFilter(), text) is None


def test_fineweb_lines_like_datatrove():
    """Blank lines are not lines; a closing quote does not end a line (datatrove's terminal punctuation)."""
    spaced = fineweb_lines(n_punct=2).replace("\n", "\n\n")  # 2 of 10 lines punctuated, not 2 of 19
    assert passes(FINEWEB_ORDER, "line_punct_ratio", verdict(FineWebFilter(), spaced))
    quoted = "\n".join(f'He said "{" ".join(words(6, 400 + i))}"' for i in range(10))
    assert verdict(FineWebFilter(), quoted) == "line_punct_ratio"


@pytest.mark.parametrize(("line", "count"), [
    ("Mr. Smith went home. He slept well", 2), ("Wait... what now", 1), ("What work is in hand? where go you", 2),
    ('He said "Hi." Then he left!', 2), ("3.14 is pi. U.S.A. is big", 2), ("Stop!!! Go on. (Yes.) Fine", 4),
    ("Dr. J. Smith arrived at 10:30 a.m. on Jan. 5. It rained.", 2), ("No end mark at all", 1),
])
def test_c4_counts_sentences_like_spacy(line, count):
    """The counts spaCy's sentencizer gives (datatrove's C4 filter counts sentences with it)."""
    assert count_sentences(line) == count


def test_build_and_normalize():
    assert [f.name for f in filters.build("fineweb,gopher")] == ["gopher_repetition", "gopher_quality", "fineweb"]
    assert filters.build("none") == []
    with pytest.raises(Exception, match="unknown filter 'gopherr'"):
        filters.build("gopherr")
    assert normalize("Cafe\u0301\r\nline\x00 two  \n\n") == "Café\nline two"
