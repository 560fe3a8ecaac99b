"""Conversations: the instruction and preference formats users bring, rendered with the tokenizer's
chat template into token ids, with the loss on the assistant's tokens only.

Record formats (detected from the keys):
  SFT         alpaca {instruction, input?, output|response, system?}; {messages: [{role, content}]};
              ShareGPT {conversations: [{from, value}], system?}; {prompt, completion} (strings or
              message lists)
  preference  {prompt, chosen, rejected} (strings or message lists); LLaMA-Factory's ShareGPT DPO
              {conversations, chosen: {from, value}, rejected}; {instruction, input?, chosen,
              rejected}; hh-rlhf full dialogues {chosen, rejected} (text or message lists) whose
              prompt is the shared prefix up to the last assistant turn.
  unpaired    {prompt, completion, label: bool} (TRL's KTO format; strings or message lists)
  prompt      {prompt (string or message list) | messages, system?, answer?, ...} for online
              alignment: the prompt alone; the whole record is kept for the reward functions.

Masking renders every prefix of the conversation (the transformers way of asking "where does this
assistant turn start and end?"): an assistant turn spans from the end of the prompt rendered with
``add_generation_prompt`` to the end of the prompt plus that turn, trailing whitespace excepted, so
the end-of-turn token is trained. Each piece is tokenized on its own, as it will be at inference
(the prompt is encoded, then the model continues it).
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from common.errors import UserError

Message = dict[str, str]
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class ChatTokenizer(Protocol):
    """What rendering needs from a tokenizer (Tessera's own or a transformers fast tokenizer)."""

    chat_template: str | None
    bos_token: str | None
    eos_token: str | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> Any: ...


class BadRecord(UserError):
    """A record that cannot become a training example; ``reason`` is a short category for counting."""

    def __init__(self, reason: str, detail: str = "", name: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.name = name
        super().__init__(f"{name or 'record'}: {reason}{': ' + detail if detail else ''}")

    def named(self, name: str) -> BadRecord:
        return BadRecord(self.reason, self.detail, name)

    def __reduce__(self) -> tuple[type[BadRecord], tuple[str, str, str | None]]:
        return BadRecord, (self.reason, self.detail, self.name)  # survives a worker process


@functools.cache
def default_chat_template() -> str:
    """Tessera's own template: ``<|role|>\\n content <|end|>`` per turn after one BOS."""
    return Path(__file__).with_name("chat_template.jinja").read_text()


# ---------------------------------------------------------------- record formats → messages


def to_messages(record: Mapping[str, Any]) -> list[Message]:
    """An SFT record in any supported format as a list of ``{role, content}`` messages."""
    _require_mapping(record)
    if "messages" in record:
        messages = _message_list(record["messages"], "messages")
    elif "conversations" in record:
        messages = _message_list(record["conversations"], "conversations")
    elif "instruction" in record:
        answer = "response" if "response" in record and "output" not in record else "output"
        messages = [*_instruction_prompt(record), _message("assistant", _field(record, answer), answer)]
    elif "prompt" in record or "completion" in record:
        messages = _turns(_field(record, "prompt"), "user") + _turns(_field(record, "completion"), "assistant")
    else:
        raise BadRecord(
            "unrecognised format",
            f"keys {sorted(record)}; expected messages, conversations, instruction/input/output or prompt/completion",
        )
    messages = _with_system(record, messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn")
    _check_not_empty(messages)
    return messages


def to_preference(record: Mapping[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    """A preference record as (prompt messages, chosen continuation, rejected continuation)."""
    _require_mapping(record)
    chosen, rejected = _field(record, "chosen"), _field(record, "rejected")
    if "conversations" in record:
        prompt = _message_list(record["conversations"], "conversations")
    elif "instruction" in record:
        prompt = _instruction_prompt(record)
    elif "prompt" in record:
        prompt = _turns(record["prompt"], "user")
    else:  # hh-rlhf: two full dialogues, the prompt is what they share
        prompt, chosen, rejected = _split_shared_prefix(_dialogue(chosen, "chosen"), _dialogue(rejected, "rejected"))
    prompt = _with_system(record, prompt)
    chosen, rejected = _turns(chosen, "assistant"), _turns(rejected, "assistant")
    if not prompt:
        raise BadRecord("empty prompt")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[0]["role"] != "assistant":
            raise BadRecord(f"{name} must start with an assistant turn")
    _check_not_empty(prompt, "prompt")
    _check_not_empty(chosen, "chosen")
    _check_not_empty(rejected, "rejected")
    return prompt, chosen, rejected


def to_prompt(record: Mapping[str, Any]) -> list[Message]:
    """A prompt record's messages, ending with a user (or system) turn for the model to answer."""
    _require_mapping(record)
    if "prompt" in record:
        messages = _turns(_field(record, "prompt"), "user")
    elif "messages" in record:
        messages = _message_list(record["messages"], "messages")
    else:
        raise BadRecord("unrecognised format", f"keys {sorted(record)}; expected prompt or messages")
    messages = _with_system(record, messages)
    if messages[-1]["role"] == "assistant":
        raise BadRecord("prompt ends with an assistant turn", "the model continues after the last user turn")
    _check_not_empty(messages, "prompt")
    return messages


def _require_mapping(record: Any) -> None:
    if not isinstance(record, Mapping):
        raise BadRecord("not a JSON object", type(record).__name__)


def _field(record: Mapping[str, Any], key: str) -> Any:
    if key not in record or record[key] is None:
        raise BadRecord(f"missing field '{key}'", f"keys {sorted(record)}")
    return record[key]


def _message(role: str, content: Any, where: str) -> Message:
    if not isinstance(content, str):
        raise BadRecord(f"'{where}' must be text", f"got {type(content).__name__}")
    return {"role": role, "content": content}


def _message_list(items: Any, where: str) -> list[Message]:
    if isinstance(items, Mapping):
        items = [items]
    if not isinstance(items, list) or not items:
        raise BadRecord(f"'{where}' must be a non-empty list of messages")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise BadRecord(f"'{where}[{i}]' is not a message object")
        role_key, text_key = ("role", "content") if "role" in item else ("from", "value")
        if role_key not in item or text_key not in item:
            raise BadRecord(f"'{where}[{i}]' needs role/content or from/value", f"keys {sorted(item)}")
        role = ROLES.get(str(item[role_key]).lower())
        if role is None:
            raise BadRecord(f"'{where}[{i}]' has unsupported role {item[role_key]!r}", f"use {', '.join(ROLES)}")
        messages.append(_message(role, item[text_key], f"{where}[{i}].{text_key}"))
    return messages


def _turns(value: Any, role: str) -> list[Message]:
    """A plain string is one turn of ``role``; a message or a message list is taken as it is."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _message_list(value, role)


def _instruction_prompt(record: Mapping[str, Any]) -> list[Message]:
    instruction = _field(record, "instruction")
    extra = record.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(extra, str):
        raise BadRecord("'instruction' and 'input' must be text")
    return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}]


def _with_system(record: Mapping[str, Any], messages: list[Message]) -> list[Message]:
    system = record.get("system")
    if system and not (messages and messages[0]["role"] == "system"):
        return [_message("system", system, "system"), *messages]
    return messages


def _check_not_empty(messages: list[Message], where: str = "turn") -> None:
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise BadRecord("empty response" if m["role"] == "assistant" else f"empty {m['role']} turn", f"{where} {i}")


def _dialogue(value: Any, where: str) -> list[Message]:
    """hh-rlhf text (``\\n\\nHuman: ...\\n\\nAssistant: ...``) or a message list."""
    if not isinstance(value, str):
        return _message_list(value, where)
    parts = HH_TURN.split(value)
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord(f"'{where}' is neither a message list nor a '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogue")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": text.strip()}
        for speaker, text in zip(parts[1::2], parts[2::2])
    ]


def _split_shared_prefix(
    chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    """The prompt is the longest shared prefix that is followed by an assistant turn in both."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and not all(k < len(d) and d[k]["role"] == "assistant" for d in (chosen, rejected)):
        k -= 1
    if k == 0:
        raise BadRecord("chosen and rejected share no prompt")
    return chosen[:k], chosen[k:], rejected[k:]


# ---------------------------------------------------------------- rendering and tokenizing


def render(
    template: str, messages: list[Message], *, add_generation_prompt: bool = False, **special_tokens: str | None
) -> str:
    """Render ``messages`` with a transformers-style Jinja chat template."""
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **_specials(special_tokens)
        )
    except UserError:
        raise
    except Exception as exc:  # a template bug: jinja syntax or undefined names
        raise UserError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None


def encode_sft(
    record: Mapping[str, Any], tokenizer: ChatTokenizer, *, max_len: int | None = None, name: str | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one SFT record: mask 1 exactly on the assistant turns' tokens.

    Longer than ``max_len`` tokens: the tail is cut; a record with no assistant token left inside
    ``max_len`` (its prompt is too long) is a :class:`BadRecord`.
    """
    try:
        template = _template(tokenizer)
        specials = _tokenizer_specials(tokenizer)
        messages = to_messages(record)
        full = render(template, messages, **specials)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = _prefix_len(render(template, messages[:i], add_generation_prompt=True, **specials), full)
                end = _prefix_len(render(template, messages[: i + 1], **specials), full)
                spans.append((start, start + len(full[start:end].rstrip())))
        ids, mask = _encode_spans(tokenizer, full, spans)
        if max_len is not None and len(ids) > max_len:
            if 1 not in mask[:max_len]:
                raise BadRecord("prompt longer than seq_len", f"{mask.index(1)} prompt tokens > {max_len}")
            ids, mask = ids[:max_len], mask[:max_len]
        return ids, mask
    except BadRecord as exc:
        raise exc.named(name or exc.name or "record") from None


def encode_preference(
    record: Mapping[str, Any], tokenizer: ChatTokenizer, *, max_len: int | None = None, name: str | None = None
) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids): the prompt ends with the assistant header; each
    continuation ends with its end-of-turn token. ``prompt + response`` is cut to ``max_len``."""
    try:
        prompt, chosen, rejected = to_preference(record)
        prompt_ids, (chosen_ids, rejected_ids) = _encode_continuations(tokenizer, prompt, [chosen, rejected], max_len)
        return prompt_ids, chosen_ids, rejected_ids
    except BadRecord as exc:
        raise exc.named(name or exc.name or "record") from None


def to_unpaired(record: Mapping[str, Any]) -> tuple[list[Message], list[Message], bool]:
    """An unpaired record (TRL's KTO format ``{prompt, completion, label}``) as (prompt messages, the
    completion's turns, whether it is desirable)."""
    _require_mapping(record)
    prompt = _with_system(record, _turns(_field(record, "prompt"), "user"))
    completion = _turns(_field(record, "completion"), "assistant")
    label = _field(record, "label")
    if not isinstance(label, bool):
        raise BadRecord("'label' must be true or false", f"got {label!r}")
    if not completion or completion[0]["role"] != "assistant":
        raise BadRecord("completion must start with an assistant turn")
    _check_not_empty(prompt, "prompt")
    _check_not_empty(completion, "completion")
    return prompt, completion, label


def encode_unpaired(
    record: Mapping[str, Any], tokenizer: ChatTokenizer, *, max_len: int | None = None, name: str | None = None
) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, completion_ids, [label]) as :func:`encode_preference` encodes one continuation."""
    try:
        prompt, completion, label = to_unpaired(record)
        prompt_ids, (completion_ids,) = _encode_continuations(tokenizer, prompt, [completion], max_len)
        return prompt_ids, completion_ids, [int(label)]
    except BadRecord as exc:
        raise exc.named(name or exc.name or "record") from None


def _encode_continuations(tokenizer: ChatTokenizer, prompt: list[Message], continuations: list[list[Message]],
                          max_len: int | None) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids (ending with the assistant header) and each continuation's (ending with its
    end-of-turn token); ``prompt + continuation`` is cut to ``max_len``."""
    template = _template(tokenizer)
    specials = _tokenizer_specials(tokenizer)
    prompt_text = render(template, prompt, add_generation_prompt=True, **specials)
    prompt_ids, _ = _encode_spans(tokenizer, prompt_text, [])
    responses = []
    for turns in continuations:
        full = render(template, prompt + turns, **specials)
        start = _prefix_len(prompt_text, full)
        responses.append(_encode_text(tokenizer, full[start:].rstrip()))
    if max_len is not None:
        if len(prompt_ids) >= max_len:
            raise BadRecord("prompt longer than seq_len", f"{len(prompt_ids)} prompt tokens >= {max_len}")
        responses = [r[: max_len - len(prompt_ids)] for r in responses]
    return prompt_ids, responses


def encode_prompt(
    record: Mapping[str, Any], tokenizer: ChatTokenizer, *, max_len: int | None = None, name: str | None = None
) -> tuple[list[int], bytes]:
    """(prompt_ids ending with the assistant header, the UTF-8 JSON of ``[name, record]``). A prompt
    longer than ``max_len`` tokens is a :class:`BadRecord` (cutting it would change the question)."""
    try:
        prompt_text = render(_template(tokenizer), to_prompt(record), add_generation_prompt=True,
                             **_tokenizer_specials(tokenizer))
        prompt_ids, _ = _encode_spans(tokenizer, prompt_text, [])
        if max_len is not None and len(prompt_ids) > max_len:
            raise BadRecord("prompt longer than max_len", f"{len(prompt_ids)} tokens > {max_len}")
        return prompt_ids, json.dumps([name, record], ensure_ascii=False).encode()
    except BadRecord as exc:
        raise exc.named(name or exc.name or "record") from None


def decode_record(data: bytes) -> tuple[str, dict[str, Any]]:
    """(name, record) back from a prompt sample's ``record`` bytes."""
    name, record = json.loads(data.decode())
    return name, record


def _template(tokenizer: ChatTokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or default_chat_template()


def _tokenizer_specials(tokenizer: ChatTokenizer) -> dict[str, str | None]:
    return {"bos_token": getattr(tokenizer, "bos_token", None), "eos_token": getattr(tokenizer, "eos_token", None)}


def _specials(tokens: dict[str, str | None]) -> dict[str, str]:
    return {k: v or "" for k, v in tokens.items()}


def _prefix_len(prefix: str, full: str) -> int:
    if not full.startswith(prefix):
        raise UserError(
            "the chat template renders a conversation's prefix differently from the whole, so assistant "
            "turns cannot be located; use a template that only appends turns"
        )
    return len(prefix)


def _encode_text(tokenizer: ChatTokenizer, text: str) -> list[int]:
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(ids, "ids", ids))


def _encode_spans(tokenizer: ChatTokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` piece by piece at the span edges; mask 1 inside the spans. One BOS."""
    ids: list[int] = []
    mask: list[int] = []
    at = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, flag in ((text[at:start], 0), (text[start:end], 1)):
            piece_ids = _encode_text(tokenizer, piece)
            ids += piece_ids
            mask += [flag] * len(piece_ids)
        at = end
    bos_id = _bos_id(tokenizer)
    if bos_id is not None:
        if ids[:2] == [bos_id, bos_id]:
            raise UserError("the chat template starts with two BOS tokens; render {{ bos_token }} once")
        if ids[:1] != [bos_id]:
            ids, mask = [bos_id, *ids], [0, *mask]
    return ids, mask


def _bos_id(tokenizer: ChatTokenizer) -> int | None:
    bos_id = getattr(tokenizer, "bos_id", None)
    if bos_id is None:
        bos_id = getattr(tokenizer, "bos_token_id", None)
    return bos_id


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama 3 templates
    return env.from_string(template)
