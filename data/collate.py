"""Objective collators: numpy pieces from the stream → batches of torch tensors.

Label convention for every causal objective (clm, sft, preference): **labels are already shifted**.
``labels[b, t]`` is the token the model should predict from position ``t`` (the next token), or
-100 to ignore; the loss is ``cross_entropy(logits[b, t], labels[b, t])`` with no further shift.
This makes document-masked packing exact: the one position whose target would be the first token
of the next document is -100, and a row's last position still has its target (rows overlap the next
by one token). ``document_ids`` number the documents inside a row from 0 and ``position_ids``
restart at 0 at every document start and at the row start, so attention restricted to equal
``document_ids`` (FlexAttention ``block_mask`` or an additive mask) sees exactly one document.

mlm labels are unshifted (the original token at masked positions, -100 elsewhere); span-corruption
labels are the decoder targets and ``decoder_input_ids`` are those shifted right after the pad id
(the T5 convention). Task batches: classification labels are one index per row ([B]); seq2seq
batches have the span-corruption keys, the source in the encoder and the target in the decoder.
Prompt batches (online alignment) are *left*-padded for generation and carry each source record's
bytes (``record_bytes``, zero-padded uint8; :func:`prompt_records` reads them back).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from data.conversations import decode_record

IGNORE_INDEX = -100  # labels that carry no loss (PyTorch's and Hugging Face's convention)


def collate_rows(
    tokens: np.ndarray, starts: np.ndarray, loss_mask: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Packed rows ``[B, L+1]`` (tokens, document-start flags, optional loss mask) → a CLM/SFT batch."""
    tokens = tokens.astype(np.int64)
    labels = np.where(starts[:, 1:], IGNORE_INDEX, tokens[:, 1:])
    if loss_mask is not None:
        labels = np.where(loss_mask[:, 1:] > 0, labels, IGNORE_INDEX)
    segment = starts[:, :-1].copy()
    segment[:, 0] = True
    index = np.broadcast_to(np.arange(segment.shape[1]), segment.shape)
    position_ids = index - np.maximum.accumulate(np.where(segment, index, 0), axis=1)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        "labels": torch.from_numpy(labels),
        "document_ids": torch.from_numpy(np.cumsum(segment, axis=1) - 1),
        "position_ids": torch.from_numpy(position_ids),
    }


def collate_mlm(
    chunks: Sequence[np.ndarray], rngs: Sequence[np.random.Generator], *, pad_id: int, mask_id: int,
    special_ids: np.ndarray, vocab_size: int, probability: float = 0.15, mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Dynamic BERT masking: ``probability`` of the non-special tokens become targets; of those
    ``mask_fraction`` are replaced by the mask token, ``random_fraction`` by a random ordinary token
    and the rest kept."""
    ids, attention = _pad([c.astype(np.int64) for c in chunks], pad_id)
    labels = np.full_like(ids, IGNORE_INDEX)
    ordinary = np.setdiff1d(np.arange(vocab_size), special_ids)
    for b, rng in enumerate(rngs):
        row = ids[b, : len(chunks[b])]
        target = (rng.random(len(row)) < probability) & ~np.isin(row, special_ids)
        labels[b, : len(row)][target] = row[target]
        action = rng.random(len(row))
        random_tokens = ordinary[rng.integers(0, len(ordinary), len(row))]
        replace_random = target & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
        row[replace_random] = random_tokens[replace_random]
        row[target & (action < mask_fraction)] = mask_id
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(attention)}


def span_noise_mask(
    length: int, density: float, mean_span: float, max_spans: int, rng: np.random.Generator
) -> np.ndarray:
    """T5's random spans: about ``density * length`` noise tokens in spans of mean ``mean_span``
    (at most ``max_spans`` spans, so longer ones when sentinels run short), alternating with
    non-noise runs and starting with one."""
    noise = min(max(round(length * density), 1), length - 1)
    spans = max(1, min(round(noise / mean_span), max_spans, noise, length - noise))
    noise_lens = _random_split(noise, spans, rng)
    keep_lens = _random_split(length - noise, spans, rng)
    lens = np.stack([keep_lens, noise_lens], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), lens)


def corrupt_spans(
    tokens: np.ndarray, rng: np.random.Generator, *, sentinel_ids: Sequence[int], eos_id: int, density: float,
    mean_span: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, decoder target) of T5 span corruption. With kept runs ``K0 K1 ..`` and noise
    spans ``N0 N1 ..``, the input is ``K0 <s0> K1 <s1> .. EOS`` and the target ``<s0> N0 <s1> N1 .. EOS``."""
    tokens = tokens.astype(np.int64)
    if len(tokens) < 2:
        return np.append(tokens, eos_id), np.array([eos_id])
    noise = span_noise_mask(len(tokens), density, mean_span, len(sentinel_ids), rng)
    sentinels = np.asarray(sentinel_ids, dtype=np.int64)
    return (np.append(_replace_runs(tokens, noise, sentinels), eos_id),
            np.append(_replace_runs(tokens, ~noise, sentinels), eos_id))


def _replace_runs(tokens: np.ndarray, runs: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """``tokens`` with each run of ``runs`` collapsed into the next sentinel."""
    first = runs & ~np.concatenate([[False], runs[:-1]])
    index = np.maximum(np.cumsum(first) - 1, 0)
    return np.where(first, sentinels[index], tokens)[~runs | first]


def collate_span(
    chunks: Sequence[np.ndarray], rngs: Sequence[np.random.Generator], *, pad_id: int, eos_id: int,
    sentinel_ids: Sequence[int], density: float = 0.15, mean_span: float = 3.0,
) -> dict[str, torch.Tensor]:
    """A T5 span-corruption batch: input_ids, attention_mask, decoder_input_ids, labels,
    decoder_attention_mask."""
    pairs = [corrupt_spans(c, rng, sentinel_ids=sentinel_ids, eos_id=eos_id, density=density, mean_span=mean_span)
             for c, rng in zip(chunks, rngs)]
    inputs, attention = _pad([p[0] for p in pairs], pad_id)
    targets, decoder_attention = _pad([p[1] for p in pairs], pad_id)
    decoder_inputs, _ = _pad([np.concatenate([[pad_id], p[1][:-1]]) for p in pairs], pad_id)
    return {
        "input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(attention),
        "decoder_input_ids": torch.from_numpy(decoder_inputs),
        "labels": torch.from_numpy(np.where(decoder_attention > 0, targets, IGNORE_INDEX)),
        "decoder_attention_mask": torch.from_numpy(decoder_attention),
    }


def collate_sft(
    samples: Sequence[tuple[np.ndarray, np.ndarray]], *, pad_id: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """Unpacked SFT: each conversation cut to ``seq_len + 1`` tokens, right-padded; labels (shifted)
    only where the loss mask is 1 (assistant turns)."""
    ids, labels = zip(*(_shifted(t[: seq_len + 1], m[: seq_len + 1]) for t, m in samples))
    input_ids, attention = _pad(list(ids), pad_id)
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(_pad(list(labels), IGNORE_INDEX)[0]),
            "attention_mask": torch.from_numpy(attention)}


def collate_preference(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *, pad_id: int, seq_len: int,
    reference_logps: np.ndarray | None = None, names: tuple[str, str] = ("chosen", "rejected"),
) -> dict[str, torch.Tensor]:
    """chosen_* and rejected_* (input_ids, labels, attention_mask), all padded to one length so they
    stack; labels are shifted and -100 on the prompt. A prompt too long for ``seq_len + 1`` tokens
    with its longer response is cut from the left (keeping at least half the budget for the prompt);
    responses are cut from the right. ``names`` renames the two prefixes (KTO's completion and kl)."""
    budget = seq_len + 1
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for prompt, chosen, rejected in samples:
        keep = min(len(prompt), max(budget // 2, budget - max(len(chosen), len(rejected))))
        prompt = prompt[len(prompt) - keep :]
        for name, response in zip(names, (chosen, rejected)):
            response = response[: budget - keep]
            tokens = np.concatenate([prompt, response])
            mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(response), np.uint8)])
            rows[name].append(_shifted(tokens, mask))
    width = max(len(ids) for pairs in rows.values() for ids, _ in pairs)
    batch: dict[str, torch.Tensor] = {}
    for name, pairs in rows.items():
        ids, attention = _pad([p[0] for p in pairs], pad_id, width)
        batch[f"{name}_input_ids"] = torch.from_numpy(ids)
        batch[f"{name}_labels"] = torch.from_numpy(_pad([p[1] for p in pairs], IGNORE_INDEX, width)[0])
        batch[f"{name}_attention_mask"] = torch.from_numpy(attention)
    if reference_logps is not None:
        batch["ref_chosen_logps"] = torch.from_numpy(np.ascontiguousarray(reference_logps[:, 0]))
        batch["ref_rejected_logps"] = torch.from_numpy(np.ascontiguousarray(reference_logps[:, 1]))
    return batch


def collate_classification(
    samples: Sequence[tuple[np.ndarray, np.ndarray]], *, pad_id: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """Texts cut to ``seq_len`` tokens and right-padded; ``labels`` [B] holds each label's index."""
    ids, attention = _pad([t[:seq_len].astype(np.int64) for t, _ in samples], pad_id)
    labels = np.array([int(label[0]) for _, label in samples], dtype=np.int64)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels)}


def collate_seq2seq(
    samples: Sequence[tuple[np.ndarray, np.ndarray]], *, pad_id: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """Source → encoder, target → decoder with teacher forcing: the same keys as a span-corruption
    batch (decoder inputs are the targets shifted right after the pad id; labels -100 on padding).
    Both sides are cut to ``seq_len`` tokens."""
    inputs, attention = _pad([s[:seq_len].astype(np.int64) for s, _ in samples], pad_id)
    targets = [t[:seq_len].astype(np.int64) for _, t in samples]
    labels, decoder_attention = _pad(targets, pad_id)
    decoder_inputs, _ = _pad([np.concatenate([[pad_id], t[:-1]]) for t in targets], pad_id)
    return {
        "input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(attention),
        "decoder_input_ids": torch.from_numpy(decoder_inputs),
        "labels": torch.from_numpy(np.where(decoder_attention > 0, labels, IGNORE_INDEX)),
        "decoder_attention_mask": torch.from_numpy(decoder_attention),
    }


def collate_unpaired(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *, pad_id: int, seq_len: int
                     ) -> dict[str, torch.Tensor]:
    """KTO batches: ``completion_*`` (each prompt with its own completion), ``kl_*`` (each prompt with
    the previous example's completion, cycling: the mismatched pairs TRL's KTOTrainer estimates the KL
    term from) and ``kto_labels`` [B] (1 desirable, 0 undesirable)."""
    completions = [c for _, c, _ in samples]
    cycled = completions[-1:] + completions[:-1]
    triples = [(p, c, k) for (p, c, _), k in zip(samples, cycled)]
    batch = collate_preference(triples, pad_id=pad_id, seq_len=seq_len, names=("completion", "kl"))
    batch["kto_labels"] = torch.tensor([int(label[0]) for _, _, label in samples])
    return batch


def collate_prompt(samples: Sequence[tuple[np.ndarray, np.ndarray]], *, pad_id: int, seq_len: int
                   ) -> dict[str, torch.Tensor]:
    """Prompts (the last ``seq_len`` tokens of each, so the assistant header stays) left-padded into
    ``prompt_input_ids``/``prompt_attention_mask``, and ``record_bytes`` [B, longest record]."""
    prompts = [p[-seq_len:].astype(np.int64)[::-1] for p, _ in samples]
    ids, attention = _pad(prompts, pad_id)
    records, _ = _pad([r for _, r in samples], 0)
    return {"prompt_input_ids": torch.from_numpy(ids[:, ::-1].copy()),
            "prompt_attention_mask": torch.from_numpy(attention[:, ::-1].copy()),
            "record_bytes": torch.from_numpy(records.astype(np.uint8))}


def prompt_records(batch: dict[str, torch.Tensor]) -> list[tuple[str, dict]]:
    """(name, record) of each row of a prompt batch."""
    return [decode_record(bytes(row[row != 0].tolist())) for row in batch["record_bytes"].cpu()]


def _shifted(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tokens = tokens.astype(np.int64)
    return tokens[:-1], np.where(mask[1:] > 0, tokens[1:], IGNORE_INDEX)


def _pad(rows: Sequence[np.ndarray], value: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D arrays into ``[B, width]``; also the 0/1 mask of real positions."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = np.full((len(rows), width), value, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
        mask[b, : len(r)] = 1
    return out, mask


def _random_split(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``parts`` positive integers summing to ``total``, uniformly at random."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.zeros(0, int)
    return np.diff(np.concatenate([[0], cuts, [total]]))

