"""The word splitter against spaCy's English tokenizer (the one datatrove's filters use).

Each expected split is what ``spacy.blank("en")`` produced for the text (spaCy 3, via datatrove 0.10)."""

import random
import re

import pytest

from data.text import _TOKEN, _TOKEN_RULES, TextView, is_punctuation, split_words

SPACY_SPLITS = [
    ("I'd you'd he'll they're we've I'm flay'd John'll I'LL",
     ["I", "'d", "you", "'d", "he", "'ll", "they", "'re", "we", "'ve", "I", "'m", "flay'd", "John'll", "I'LL"]),
    ("don't can't won't isn't cannot it’s don’t I’ll",
     ["do", "n't", "ca", "n't", "wo", "n't", "is", "n't", "can", "not", "it", "’s", "do", "n’t", "I", "’ll"]),
    ("John's JOHN'S Peter’s dogs' o'er ne'er o' 'tis th'",
     ["John", "'s", "JOHN", "'S", "Peter", "’s", "dogs", "'", "o'er", "ne'er", "o", "'", "'", "tis", "th", "'"]),
    ("on't DON'T Shouldn't 'em 'cause I'd've I... Mr... J. a.",
     ["on't", "DON'T", "Should", "n't", "'em", "'cause", "I", "'d", "'ve", "I", "...", "Mr", "...", "J.", "a."]),
    ("Hello?! Wait... what?? (yes) \"quoted\" well—then a--b",
     ["Hello", "?", "!", "Wait", "...", "what", "?", "?", "(", "yes", ")", '"', "quoted", '"', "well", "—", "then",
      "a", "--", "b"]),
    ("3.14 1,000 $5.00 50% 5th", ["3.14", "1,000", "$", "5.00", "50", "%", "5th"]),
    ("Mr. Smith vs. Dr. Who, U.S.A. and e.g. i.e. etc. St. Paul Jan. 5",
     ["Mr.", "Smith", "vs.", "Dr.", "Who", ",", "U.S.A.", "and", "e.g.", "i.e.", "etc", ".", "St.", "Paul", "Jan.",
      "5"]),
    ("See http://example.com/a?b=c and www.x.org #tag e-mail",
     ["See", "http://example.com/a?b=c", "and", "www.x.org", "#", "tag", "e", "-", "mail"]),
    ("“quote” ‘single’ …and… the end. CAPS. OK. word.Word",
     ["“", "quote", "”", "‘", "single", "’", "…", "and", "…", "the", "end", ".", "CAPS", ".", "OK", ".", "word", ".",
      "Word"]),
    ("COVID-19-related IL-3 mid-1990s B2-3 1-2 84/100 9/11 1/2-inch Amazon.co.uk index.html end.the",
     ["COVID-19", "-", "related", "IL-3", "mid-1990s", "B2", "-", "3", "1", "-", "2", "84/100", "9/11", "1/2", "-",
      "inch", "Amazon.co.uk", "index.html", "end.the"]),
    ("US$ 5 or 5$ to CSRInfo@CalRetirees.org.", ["US$", "5", "or", "5", "$", "to", "CSRInfo@CalRetirees.org", "."]),
    ("30mph 1.5km B2G 4K 12kg, 5th H2O 1990s", ["30", "mph", "1.5", "km", "B2", "G", "4", "K", "12", "kg", ",", "5th",
                                               "H2O", "1990s"]),
]


@pytest.mark.parametrize(("text", "tokens"), SPACY_SPLITS, ids=[t[:20] for t, _ in SPACY_SPLITS])
def test_split_words_follows_spacy(text, tokens):
    assert split_words(text) == tokens


def test_plain_words_drop_symbol_tokens():
    view = TextView("Well -- the end... (really) «ok» ___ 42 １ café!")
    assert view.plain_words == ["Well", "the", "end", "really", "ok", "42", "café"]
    assert is_punctuation("«…»") and not is_punctuation("a.")


def test_the_plain_word_shortcut_splits_as_the_rules_alone():
    """Random text made of the pieces the rules look at (URL starts, abbreviations, numbers, contractions,
    word continuations, non-ASCII letters): the splitter with its shortcut cuts as the rules alone."""
    rules = re.compile(_TOKEN_RULES)
    pieces = ["http", "https", "://", "www", ".", "..", ":", "'", "’", "s", "t", "n", "ll", "-", "--", "/", "$", "@",
              "word", "Mr", "U", "S", "J", "e", "g", "co", "uk", "3", "14", ",", "_", "é", "ß", "Ⅻ", " ", " ", "\n",
              "(", ")", "\"", "!", "?", "x2", "mph", "cannot"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choices(pieces, k=rng.randint(1, 30)))
        assert _TOKEN.findall(text) == rules.findall(text), text
