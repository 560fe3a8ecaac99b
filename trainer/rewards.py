"""Rewards for online alignment: what ``align.reward`` names, resolved once into a :class:`Rewards`.

A reward function maps (prompt, completion, record) → float, where ``record`` is the prompt
shard's JSON record (its ``answer`` and any other fields). ``align.reward`` lists one or more of:

  exact_match      1 if the completion, stripped, equals the record's ``answer`` (as text), else 0
  boxed            1 if the last ``\\boxed{...}`` in the completion holds the record's ``answer``, else 0
  regex:PATTERN    1 if ``re.search(PATTERN, completion)`` finds a match, else 0
  module:function  a Python callable ``function(prompt, completion, record) -> float``
  PATH             a reward model (``train.objective=reward``'s checkpoint, same tokenizer): the scalar
                   score of the prompt's and the completion's tokens as the policy produced them

Several are summed with ``align.reward_weights`` (default 1 each), as TRL's GRPOTrainer sums its
``reward_funcs`` with ``reward_weights`` (trl/trainer/grpo_trainer.py). A function that raises, or
returns NaN or a non-number, stops the run with one line naming the function and the record; a
module that does not import, or lacks the function, is one line at config time.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError, UserError

RewardFunction = Callable[[str, str, Mapping[str, Any]], float]


def _answer(record: Mapping[str, Any], reward: str) -> str:
    if "answer" not in record or record["answer"] is None:
        raise KeyError(f"the record has no 'answer' field, which reward {reward} needs")
    return normalise(str(record["answer"]))


def normalise(text: str) -> str:
    """Whitespace runs become one space; the ends are stripped."""
    return " ".join(text.split())


def exact_match(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
    return float(normalise(completion) == _answer(record, "exact_match"))


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, at = 1, start + len("\\boxed{")
    for i in range(at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[at:i]
    return None


def boxed(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
    inside = last_boxed(completion)
    return float(inside is not None and normalise(inside) == _answer(record, "boxed"))


def regex_reward(pattern: str) -> RewardFunction:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"align.reward: regex:{pattern} is not a valid regular expression ({exc})") from None

    def reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        return float(compiled.search(completion) is not None)

    return reward


BUILTIN_REWARDS: dict[str, RewardFunction] = {"exact_match": exact_match, "boxed": boxed}
PARAMETRISED_REWARDS: dict[str, Callable[[str], RewardFunction]] = {"regex": regex_reward}


def import_reward(spec: str) -> RewardFunction:
    """``module:function`` → the callable (the module found on sys.path, as ``python -m`` would)."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure inside the user's module is the user's to fix
        raise ConfigError(f"align.reward: module {module_name!r} does not import ({type(exc).__name__}: {exc})"
                          ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"align.reward: module {module_name!r} has no function {function_name!r}")
    return function


class RewardModel:
    """A Bradley–Terry reward model (a classifier with one score) on the policy's own token ids."""

    def __init__(self, path: str) -> None:
        from model.io import load_pretrained

        try:
            self.model = load_pretrained(path).eval().requires_grad_(False)
        except UserError as exc:
            raise ConfigError(f"align.reward: {path} is not a reward model checkpoint ({exc})") from None
        config = self.model.config
        if getattr(self.model, "score", None) is None or config.n_labels != 1:
            raise ConfigError(f"align.reward: {path} is not a reward model (train.objective=reward makes one: "
                              "a classifier with n_labels=1)")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if device != input_ids.device:
            self.model.to(input_ids.device)
        return self.model(input_ids, attention_mask=attention_mask)[:, 0].double().cpu()


def resolve_reward(spec: str) -> RewardFunction | RewardModel:
    """One entry of ``align.reward`` → its function (or reward model)."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    kind, sep, argument = spec.partition(":")
    if sep and kind in PARAMETRISED_REWARDS:
        return PARAMETRISED_REWARDS[kind](argument)
    if Path(spec).is_dir():
        return RewardModel(spec)
    if sep and kind and argument:
        return import_reward(spec)
    choices = [*BUILTIN_REWARDS, *(f"{k}:PATTERN" for k in PARAMETRISED_REWARDS), "module:function",
               "a reward model directory"]
    raise ConfigError(f"align.reward: {spec!r} is not one of {', '.join(choices)}")


@dataclasses.dataclass(frozen=True)
class Rewards:
    """The run's reward functions and their weights."""

    names: tuple[str, ...]
    functions: tuple[RewardFunction | RewardModel, ...]
    weights: tuple[float, ...]

    def score(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping[str, Any]],
              record_names: Sequence[str], tokens: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
        """Per function rewards, ``[completions, functions]`` float64; reward models read ``tokens``
        (the sequences' ids and attention mask)."""
        out = torch.zeros(len(completions), len(self.functions), dtype=torch.float64)
        for j, (name, function) in enumerate(zip(self.names, self.functions)):
            if isinstance(function, RewardModel):
                if tokens is None:
                    raise ValueError(f"reward {name} is a reward model: it needs the token ids")
                out[:, j] = function(*tokens)
                continue
            for i, (prompt, completion, record, record_name) in enumerate(
                    zip(prompts, completions, records, record_names, strict=True)):
                out[i, j] = self._call(name, function, prompt, completion, record, record_name)
        return out

    def total(self, per_function: torch.Tensor) -> torch.Tensor:
        """The weighted sum over functions: one reward per completion."""
        return per_function @ torch.tensor(self.weights, dtype=per_function.dtype)

    @staticmethod
    def _call(name: str, function: RewardFunction, prompt: str, completion: str, record: Mapping[str, Any],
              record_name: str) -> float:
        try:
            value = function(prompt, completion, record)
        except Exception as exc:  # the user's function: say where, not a traceback
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise UserError(f"reward {name} failed on {record_name}: {type(exc).__name__}: {detail}") from None
        if not isinstance(value, numbers.Real):  # bool and NumPy scalars are Real too
            raise UserError(f"reward {name} returned {type(value).__name__} {value!r} on {record_name}; "
                            "it must return a float")
        if not math.isfinite(value):
            raise UserError(f"reward {name} returned {value} on {record_name}; rewards must be finite numbers")
        return float(value)


def build_rewards(specs: Sequence[str], weights: Sequence[float] = ()) -> Rewards:
    """``align.reward`` and ``align.reward_weights`` → :class:`Rewards` (all imports happen here)."""
    if not specs:
        raise ConfigError("align.reward is not set; name exact_match, boxed, regex:PATTERN, module:function "
                          "or a reward model directory")
    if weights and len(weights) != len(specs):
        raise ConfigError(f"align.reward_weights has {len(weights)} weights for {len(specs)} rewards")
    functions = tuple(resolve_reward(s) for s in specs)
    return Rewards(tuple(specs), functions, tuple(float(w) for w in weights) or (1.0,) * len(specs))
