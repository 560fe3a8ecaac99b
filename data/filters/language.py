"""Language identification: keep documents whose language is one of those chosen, at a score over a threshold.

The identifier is py3langid's (langid.py's naive Bayes model over 140 languages, shipped inside the
package as a NumPy archive read without pickle: nothing is downloaded at run time). Scores are
normalised probabilities, and the threshold defaults to datatrove's LanguageFilter (0.65). Only the
first ``MAX_CHARS`` characters are scored (the decision rarely changes past them; it bounds the cost).
"""

from __future__ import annotations

import functools

from common.errors import UserError
from data.text import TextView

DEFAULT_THRESHOLD = 0.65
MAX_CHARS = 20_000


@functools.cache
def identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of ``text``'s language."""
    language, score = identifier().classify(text[:MAX_CHARS].replace("\n", " "))
    return language, float(score)


class LanguageFilter:
    name = "language"

    def __init__(self, languages: list[str], threshold: float = DEFAULT_THRESHOLD) -> None:
        known = set(identifier().labels)
        unknown = [code for code in languages if code not in known]
        if unknown:
            raise UserError(f"unknown language code(s) {', '.join(unknown)}; the identifier knows "
                            f"{', '.join(sorted(known))}")
        if not 0 <= threshold <= 1:
            raise UserError(f"--language-threshold must be in [0, 1], got {threshold}")
        self.languages, self.threshold = set(languages), threshold

    def __call__(self, doc: TextView) -> str | None:
        language, score = identify(doc.text)
        if language not in self.languages:
            return language
        return None if score >= self.threshold else f"{language}_below_{self.threshold:g}"
