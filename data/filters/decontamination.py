"""N-gram decontamination: drop training documents that contain an n-gram of an evaluation item.

As datatrove's NGramsDecontFilter (12-grams by default, over the simplified text: lower case,
punctuation removed): the n-grams of each item's answer, and those that straddle its question and
answer, are indexed; a document holding any of them is removed, and the report names the file the
item came from. Evaluation files are .jsonl/.json records (question in ``query``, ``prompt``,
``question``, ``instruction``, ``context``, ``ctx`` or ``input``; answer in ``answer``, ``gold``,
``output``, ``completion``, ``target`` or ``text``, or ``choices``/``endings``/``options`` indexed by
an integer ``label``/``gold``/``answer``), or .txt files with one item per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import UserError
from data.dedup import simplify
from data.readers import iter_records
from data.text import TextView

DEFAULT_NGRAM = 12
QUESTION_FIELDS = ("query", "prompt", "question", "instruction", "context", "ctx", "input")
ANSWER_FIELDS = ("answer", "gold", "output", "completion", "target", "text")
CHOICE_FIELDS = ("choices", "endings", "options")
INDEX_FIELDS = ("label", "gold", "answer")


def question_and_answer(record: dict[str, Any], where: str) -> tuple[str, str]:
    """An evaluation record's question (may be empty) and correct answer."""
    question = next((record[k] for k in QUESTION_FIELDS if isinstance(record.get(k), str)), "")
    answer = next((record[k] for k in ANSWER_FIELDS if isinstance(record.get(k), str)), None)
    choices = next((record[k] for k in CHOICE_FIELDS if isinstance(record.get(k), list)), None)
    index = next((record[k] for k in INDEX_FIELDS if isinstance(record.get(k), int | str)), None)
    if choices is not None and index is not None:
        try:
            answer = str(choices[int(index)])
        except (ValueError, IndexError):
            raise UserError(f"{where}: label {index!r} does not index its {len(choices)} choices") from None
    if answer is None:
        raise UserError(f"{where}: no answer field (one of {', '.join(ANSWER_FIELDS)}, or choices with a label)")
    return question, answer


class Decontamination:
    name = "decontaminated"

    def __init__(self, eval_files: list[str | Path], ngram: int = DEFAULT_NGRAM) -> None:
        if ngram < 1:
            raise UserError(f"--decontaminate-ngram must be at least 1, got {ngram}")
        self.ngram = ngram
        self.index: dict[str, str] = {}  # n-gram → the file its item came from
        for path in map(Path, eval_files):
            items = self._items(path)
            if not items:
                raise UserError(f"{path}: no evaluation items to decontaminate against")
            for question, answer in items:
                for gram in self._item_ngrams(simplify(question).split(), simplify(answer).split()):
                    self.index.setdefault(gram, path.stem)

    @staticmethod
    def _items(path: Path) -> list[tuple[str, str]]:
        if not path.is_file():
            raise UserError(f"no such evaluation file: {path}")
        if path.suffix == ".txt":
            return [("", line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [question_and_answer(record, name) for name, record in iter_records([path])]

    def _item_ngrams(self, question: list[str], answer: list[str]) -> list[str]:
        n = self.ngram
        grams = [answer[i : i + n] for i in range(len(answer) - n + 1)]
        for i in range(n - 1):  # straddling question and answer, as datatrove's find_overlap_ngrams
            head, tail = question[len(question) - (n - 1 - i):] if n - 1 - i else [], answer[: i + 1]
            if len(head) == n - 1 - i and len(tail) == i + 1:
                grams.append(head + tail)
        return [" ".join(g) for g in grams if g]

    def __call__(self, doc: TextView) -> str | None:
        words = simplify(doc.text).split()
        for i in range(max(1, len(words) - self.ngram + 1)):
            source = self.index.get(" ".join(words[i : i + self.ngram]))
            if source is not None:
                return source
        return None
