"""Rollouts: completions sampled from the current policy with the KV-cached generator, and the
per-token log-probs of those completions under any model (policy, reference).

A prompt batch is left-padded (:func:`data.collate.collate_prompt`), so every prompt ends at the same
column and the completions start together: row ``i`` of the rollout is completion ``i % G`` of
prompt ``i // G``. A completion's mask covers its tokens up to and including the first stop token
(EOS or the chat turn's end); one with no stop token within ``max_new_tokens`` is *truncated*
(TRL's ``completions/clipped_ratio``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from model.generate import generate
from trainer.distributed import unwrap


@dataclasses.dataclass(frozen=True)
class Completions:
    """``input_ids``/``attention_mask`` [N, P + C]: prompt then completion; ``completion_mask`` [N, C]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    prompt_length: int

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]


def stop_mask(completions: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the tokens up to and including the first stop token, rows that never stop)."""
    is_stop = torch.isin(completions, torch.tensor(list(stop_ids), device=completions.device))
    stopped_before = (is_stop.long().cumsum(1) - is_stop.long()) > 0
    return (~stopped_before).long(), ~is_stop.any(1)


@torch.no_grad()
def sample_completions(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                       num_generations: int, max_new_tokens: int, temperature: float, top_p: float,
                       stop_ids: Sequence[int], pad_id: int, generator: torch.Generator | None,
                       stop_when_done: bool = True) -> Completions:
    """``num_generations`` completions of every prompt (rows of a prompt adjacent)."""
    ids = prompt_ids.repeat_interleave(num_generations, 0)
    mask = prompt_mask.repeat_interleave(num_generations, 0)
    sequences = generate(unwrap(model), ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, eos_token_ids=stop_ids, pad_token_id=pad_id,
                         generator=generator, stop_when_done=stop_when_done)
    prompt_length = ids.shape[1]
    completion_mask, truncated = stop_mask(sequences[:, prompt_length:], stop_ids)
    attention = torch.cat([mask, torch.ones_like(sequences[:, prompt_length:])], 1)  # as the sampler saw it
    return Completions(sequences, attention, completion_mask, truncated, prompt_length)


def completion_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     prompt_length: int, temperature: float = 1.0, with_entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [N, C] of the completion tokens (and the entropy of each position's
    distribution), with the logits divided by the sampling temperature as TRL does
    (``_get_per_token_logps_and_entropies`` in trl/trainer/grpo_trainer.py)."""
    logits = model(input_ids, attention_mask=attention_mask)[:, prompt_length - 1 : -1]
    return token_logps(logits, input_ids[:, prompt_length:], temperature, with_entropy)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N, C] of ``tokens`` under the logits [N, C, V] that predict them (divided by the
    sampling temperature), and each position's entropy."""
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    logps = logprobs.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1) if with_entropy else None
    return logps, entropy
