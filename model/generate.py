"""Decoding with a KV cache: greedy, temperature / top-k / top-p sampling, and beam search, for
decoder-only and encoder-decoder models; batched prompts with left padding; stop tokens; seeded.

Decoder models return the prompt followed by the new tokens ([B, T + new]); encoder-decoder models
return the decoder sequence starting with the decoder start token ([B, 1 + new]), as transformers
does. After a stop token a row is filled with ``pad_token_id``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.errors import UserError
from model.attention import KVCache
from model.transformer import Seq2SeqLM, TesseraModel, TransformerLM


class _Stepper:
    """Feeds a growing token sequence to the model and returns next-token logits [N, V]."""

    def __init__(self, model: TesseraModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 use_cache: bool) -> None:
        self.model = model
        self.seq2seq = isinstance(model, Seq2SeqLM)
        self.cache = KVCache() if use_cache else None
        self.fed = 0
        self.prompt_mask = attention_mask
        if self.seq2seq:
            self.memory = model.encode(input_ids, attention_mask)

    def __call__(self, seq: torch.Tensor) -> torch.Tensor:
        new = seq[:, self.fed:] if self.cache is not None else seq
        if self.seq2seq:
            logits = self.model.decode(new, self.memory, attention_mask=self.prompt_mask, cache=self.cache)
        else:
            mask = self.prompt_mask
            if mask is not None:
                extra = seq.shape[1] - mask.shape[1]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1)
            logits = self.model(new, attention_mask=mask, cache=self.cache)
        self.fed = seq.shape[1]
        return logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)
        if self.prompt_mask is not None:
            self.prompt_mask = self.prompt_mask.index_select(0, index)
        if self.seq2seq:
            self.memory = self.memory.index_select(0, index)


def select_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [N] from logits [N, V]: argmax at temperature 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -torch.inf)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: TesseraModel, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             num_beams: int = 1, eos_token_ids: Sequence[int] = (), pad_token_id: int | None = None,
             decoder_start_token_id: int | None = None, seed: int | None = None, use_cache: bool = True,
             length_penalty: float = 1.0, generator: torch.Generator | None = None,
             stop_when_done: bool = True) -> torch.Tensor:
    """Continue ``input_ids`` [B, T] (left-padded, with ``attention_mask``, when rows differ in length).

    Sampling draws from ``generator`` (one the caller keeps, e.g. to checkpoint its state), else from
    a fresh one seeded with ``seed``, else from torch's global RNG. ``stop_when_done=False`` runs all
    ``max_new_tokens`` steps even once every row has stopped: ranks of a sharded model must make the
    same number of forwards."""
    if not isinstance(model, (TransformerLM, Seq2SeqLM)) or (isinstance(model, TransformerLM)
                                                             and not model.config.causal):
        raise UserError("generate needs a decoder or encoder_decoder LM (not an encoder or classifier)")
    _check_arguments(model, input_ids, max_new_tokens, temperature, top_k, top_p, num_beams)
    cfg = model.config
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if isinstance(model, Seq2SeqLM):
        start = cfg.pad_token_id if decoder_start_token_id is None else decoder_start_token_id
        seq = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
    else:
        seq = input_ids
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            return _beam_search(model, input_ids, attention_mask, seq, max_new_tokens, num_beams, eos, pad,
                                use_cache, length_penalty)
        if generator is None and seed is not None:
            generator = torch.Generator(input_ids.device).manual_seed(seed)
        step = _Stepper(model, input_ids, attention_mask, use_cache)
        done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
        for _ in range(max_new_tokens):
            token = select_next(step(seq), temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            seq = torch.cat([seq, token[:, None]], dim=1)
            done |= torch.isin(token, eos)
            if stop_when_done and bool(done.all()):
                break
        return seq
    finally:
        model.train(was_training)


def _beam_search(model: TesseraModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 seq: torch.Tensor, max_new_tokens: int, beams: int, eos: torch.Tensor, pad: int, use_cache: bool,
                 length_penalty: float) -> torch.Tensor:
    """Beam search: keep the ``beams`` best unfinished prefixes per row; a prefix that ends in a stop
    token is set aside with score sum(logprob) / length**length_penalty; the best scored wins."""
    batch, prompt_len = seq.shape
    expand = torch.arange(batch, device=seq.device).repeat_interleave(beams)
    mask = attention_mask.index_select(0, expand) if attention_mask is not None else None
    step = _Stepper(model, input_ids.index_select(0, expand), mask, use_cache)
    seq = seq.index_select(0, expand)
    scores = torch.zeros(batch, beams, device=seq.device)
    scores[:, 1:] = -torch.inf  # all beams start equal: let only the first one propose
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    stop = set(eos.tolist())
    for length in range(1, max_new_tokens + 1):
        logprobs = torch.log_softmax(step(seq), dim=-1)
        vocab = logprobs.shape[-1]
        candidates = (scores.view(-1, 1) + logprobs).view(batch, beams * vocab)
        top_scores, top_ids = candidates.topk(2 * beams, dim=-1)
        next_scores = torch.full_like(scores, -torch.inf)
        next_rows = torch.zeros(batch, beams, dtype=torch.long, device=seq.device)
        next_tokens = torch.full((batch, beams), pad, dtype=torch.long, device=seq.device)
        for b in range(batch):
            kept = 0
            for score, idx in zip(top_scores[b].tolist(), top_ids[b].tolist()):
                row, token = b * beams + idx // vocab, idx % vocab
                if score == -torch.inf:
                    break
                if token in stop:
                    finished[b].append((score / length**length_penalty, torch.cat([seq[row], seq.new_tensor([token])])))
                    continue
                next_scores[b, kept], next_rows[b, kept], next_tokens[b, kept] = score, row, token
                kept += 1
                if kept == beams:
                    break
        rows = next_rows.view(-1)
        seq = torch.cat([seq.index_select(0, rows), next_tokens.view(-1, 1)], dim=1)
        step.reorder(rows)
        scores = next_scores
        if all(len(f) >= beams and max(s for s, _ in f) >= scores[b].max().item() / length**length_penalty
               for b, f in enumerate(finished)):
            break
    out = []
    for b in range(batch):
        alive = [(scores[b, k].item() / (seq.shape[1] - prompt_len) ** length_penalty, seq[b * beams + k])
                 for k in range(beams) if scores[b, k] > -torch.inf]
        out.append(max(finished[b] + alive, key=lambda item: item[0])[1])
    width = max(len(s) for s in out)
    return torch.stack([torch.cat([s, s.new_full((width - len(s),), pad)]) for s in out])


def _check_arguments(model: TesseraModel, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                     top_k: int, top_p: float, num_beams: int) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise UserError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if num_beams < 1:
        raise UserError(f"num_beams must be at least 1, got {num_beams}")
    if num_beams > 1 and temperature > 0:
        raise UserError("beam search is deterministic: use num_beams > 1 with temperature 0")
    cfg = model.config
    decoder_len = (1 if isinstance(model, Seq2SeqLM) else input_ids.shape[1]) + max_new_tokens
    if not cfg.covers(max(decoder_len, input_ids.shape[1])):
        raise UserError(f"prompt + max_new_tokens = {decoder_len} tokens exceeds max_seq_len={cfg.max_seq_len}")
