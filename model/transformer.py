"""The three architectures and their heads, assembled from ``model.blocks``.

- :class:`TransformerLM`: decoder (causal LM) or encoder (masked LM), one stack.
- :class:`Seq2SeqLM`: encoder + decoder with cross-attention, shared token embeddings.
- :class:`SequenceClassifier`: one stack + a linear score head (classification / reward model).

``build_model(cfg, head)`` picks the class. Every model has ``.config``, ``.blocks()`` (the units
a trainer wraps with FSDP and activation checkpointing), ``.output_weight()`` and a seeded
``init_weights``. An LM's forward takes a ``head_loss``: the loss over the head's input, weight and
bias, computed inside forward, where sharded strategies (ZeRO-3, FSDP) have the weight gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from model.attention import Attention, KVCache
from model.blocks import Block, Stack
from model.config import Arch, InitScheme, ModelConfig, NormPosition, Pos
from model.lazy_weights import LazyTensor
from model.mlp import MLP
from model.moe import Experts
from model.norm import RMSNorm, make_norm
from model.position import AbsolutePositions

HEADS = ("lm", "classifier")

HeadLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``(hidden [..., D], weight [V, D], bias [V] | None) -> loss``: e.g. a fused linear + cross-entropy."""


class Embeddings(nn.Module):
    """Token embeddings plus absolute positions (learned / sinusoidal); post-norm models normalise them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = AbsolutePositions(cfg) if cfg.pos in (Pos.learned, Pos.sinusoidal) else None
        self.norm = make_norm(cfg) if cfg.norm_position == NormPosition.post else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids)
        if self.positions is not None:
            x = x + self.positions(position_ids).to(x.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class OutputHead(nn.Module):
    """Hidden states → vocabulary logits. Masked LMs first transform (dense, GELU, norm) and add a bias.

    A tied head uses the token embedding matrix; ``scale_output`` multiplies the hidden states by
    d_model**-0.5 first (original T5 with tied embeddings).
    """

    def __init__(self, cfg: ModelConfig, masked: bool) -> None:
        super().__init__()
        if masked:
            self.transform = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias),
                                           nn.GELU("tanh" if cfg.gelu_tanh else "none"), make_norm(cfg))
        else:
            self.transform = None
        self.weight = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if masked else None
        self.scale = cfg.d_model**-0.5 if cfg.scale_output else 1.0

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, return_hidden: bool = False,
                head_loss: HeadLoss | None = None) -> torch.Tensor:
        if self.transform is not None:
            hidden = self.transform(hidden)
        if self.scale != 1.0:
            hidden = hidden * self.scale
        if head_loss is not None:
            return head_loss(hidden, weight, self.bias)
        if return_hidden:
            return hidden
        return F.linear(hidden, weight, self.bias).float()


class TesseraModel(nn.Module):
    """What every Tessera model offers besides ``forward``."""

    config: ModelConfig
    # checkpoint tensors (by state-dict name) that ``materialize`` copies in after init (lazy ``load_pretrained``)
    weights_source: dict[str, LazyTensor] | None = None
    # with LoRA adapters (model/lora.py): their config, and the base they adapt (model.io.AdapterBase)
    lora_config = None
    adapter_base = None

    def blocks(self) -> list[nn.Module]:
        """All transformer blocks (encoder's, then decoder's)."""
        return [m for m in self.modules() if isinstance(m, Block)]

    def embeddings(self) -> nn.Embedding:
        return self.embed.tokens

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise by ``init_scheme``. normal: N(0, init_std) (token embeddings N(0, 1) under a tied
        head scaled by d_model**-0.5, as T5), residual output projections scaled by 1/sqrt(2·blocks).
        t5 (T5's own, as mesh-tensorflow and transformers): every matrix N(0, fan_in**-0.5), queries
        also by head_dim**-0.5 (T5 attention has no score scaling), token embeddings N(0, 1), other
        tables and an untied head N(0, d_model**-0.5) (N(0, 1) when the head's input is scaled).
        Both: zero biases, unit norms; recompute fixed buffers (RoPE, sinusoidal, ALiBi). Random numbers
        come from ``seed`` when given, else from torch's global RNG (so ``torch.manual_seed`` governs
        :func:`build_model`'s init).
        Meta tensors are left alone."""
        device = next(self.parameters()).device
        generator = None if seed is None or device.type == "meta" else torch.Generator(device).manual_seed(seed)
        init = self._initializer(generator)
        for module in self.modules():
            init(module)

    @torch.no_grad()
    def materialize(self, device: torch.device | str, seed: int | None = None,
                    on_block: Callable[[nn.Module], None] | None = None) -> None:
        """Give a model built on the meta device its tensors on ``device``, initialised as
        :meth:`init_weights` would (the same numbers), then overwritten by ``weights_source``'s (read
        as they are reached), one block at a time: ``on_block(block)`` runs as soon as a block is
        ready (a sharding strategy shards it there), so besides the embeddings, final norm and head,
        at most one whole block need exist at once."""
        device = torch.device(device)
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        init = self._initializer(generator)
        weights, self.weights_source = self.weights_source or {}, None

        def ready(module: nn.Module, prefix: str) -> None:
            init(module)
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                source = weights.get(f"{prefix}.{name}" if prefix else name)
                if source is not None:
                    tensor.copy_(source.load())

        done: set[int] = set()
        for prefix, module in self.named_modules():  # init_weights' order
            if id(module) in done:
                continue
            if isinstance(module, Block):
                module.to_empty(device=device)
                for name, inner in module.named_modules(prefix=prefix):
                    ready(inner, name)
                    done.add(id(inner))
                if on_block is not None:
                    on_block(module)
            else:
                module.to_empty(device=device, recurse=False)
                ready(module, prefix)

    def _initializer(self, generator: torch.Generator | None) -> Callable[[nn.Module], None]:
        """What :meth:`init_weights` does to one module (its own tensors only). LoRA adapters draw
        from a generator of their own, so the base weights are the same with adapters or without."""
        cfg = self.config
        adapter_generator = None
        if generator is not None:
            adapter_generator = torch.Generator(generator.device).manual_seed(generator.initial_seed() + 1)
        t5 = cfg.init_scheme == InitScheme.t5
        std = cfg.d_model**-0.5 if t5 else cfg.init_std  # embedding tables and an untied, unscaled head
        residual_std = std / math.sqrt(2 * len(self.blocks()))
        residual = {id(m.out) for m in self.modules() if isinstance(m, Attention)}
        residual |= {id(m.down) for m in self.modules() if isinstance(m, MLP)}
        queries = {id(m.q if m.cross else m.qkv): m.n_heads * m.head_dim
                   for m in self.modules() if isinstance(m, Attention)}  # their first rows are the queries
        # A head whose input is scaled by d_model**-0.5 (original T5) expects N(0, 1) weights, as T5 and
        # transformers initialise them: at init_std 0.02 its logits would start ~50x too flat.
        tokens = self.embeddings()
        tokens_std = 1.0 if t5 or (cfg.scale_output and cfg.tie_embeddings) else std

        def normal(t: torch.Tensor, s: float) -> None:
            if not t.is_meta:
                nn.init.normal_(t, 0.0, s, generator=generator)

        def matrix(t: torch.Tensor, normal_std: float) -> None:  # [..., out, in]
            normal(t, t.shape[-1] ** -0.5 if t5 else normal_std)

        def init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                matrix(module.weight, residual_std if id(module) in residual else std)
                if t5 and id(module) in queries and not module.weight.is_meta:
                    module.weight[: queries[id(module)]] *= cfg.head_dim**-0.5
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                normal(module.weight, tokens_std if module is tokens else std)
            elif isinstance(module, Experts):  # as the dense MLP: down is a residual output projection
                matrix(module.up, std)
                matrix(module.down, residual_std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
            elif isinstance(module, OutputHead):
                if module.weight is not None:
                    normal(module.weight, 1.0 if t5 and cfg.scale_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()
            if hasattr(module, "reset_adapter"):
                module.reset_adapter(adapter_generator)

        return init

    def check_length(self, length: int) -> None:
        """Refuse sequences longer than the position tables (learned, sinusoidal, RoPE) cover."""
        cfg = self.config
        if not cfg.covers(length):
            raise UserError(f"a sequence of {length} tokens is longer than model.max_seq_len={cfg.max_seq_len}")

    def output_weight(self) -> torch.Tensor:
        """The LM head weight [V, D] (the token embeddings when tied)."""
        head = self.head
        return head.weight if head.weight is not None else self.embed.tokens.weight

    def output_bias(self) -> torch.Tensor | None:
        """The LM head bias [V] (masked LMs only), for a fused linear + cross-entropy."""
        return self.head.bias


def resolve_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      document_ids: torch.Tensor | None, position_ids: torch.Tensor | None,
                      offset: int = 0) -> torch.Tensor:
    """Position ids [B, T]: given ones; else restart at each document; else count real tokens of
    ``attention_mask`` (which may cover cached tokens too, so left padding starts at 0); else
    ``offset + arange(T)``."""
    if position_ids is not None:
        return position_ids
    batch, length = input_ids.shape
    index = torch.arange(length, device=input_ids.device).expand(batch, length)
    if document_ids is not None:
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        return index - torch.where(starts, index, 0).cummax(dim=1).values
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    return index + offset


class TransformerLM(TesseraModel):
    """Decoder-only causal LM (arch=decoder) or encoder masked LM (arch=encoder)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.stack = Stack(cfg, cfg.n_layers, causal=cfg.causal)
        self.head = OutputHead(cfg, masked=not cfg.causal)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False, cache: KVCache | None = None,
                prefix_lengths: torch.Tensor | None = None, head_loss: HeadLoss | None = None) -> torch.Tensor:
        """Logits [B, T, V] (fp32), the head's input [B, T, D] when ``return_hidden``, or what
        ``head_loss`` makes of the head's input, weight and bias.

        ``attention_mask`` marks real tokens (True) and, with a ``cache``, covers cached tokens too.
        ``prefix_lengths`` [B] makes a decoder a prefix-LM: the first n tokens of a row see each other.
        """
        if prefix_lengths is not None and not self.config.causal:
            raise UserError("prefix_lengths is for a causal decoder; an encoder already sees every token")
        offset = cache.length(self.stack.layers[0].attn.layer_id) if cache is not None else 0
        self.check_length(offset + input_ids.shape[1])
        positions = resolve_positions(input_ids, attention_mask, document_ids, position_ids, offset)
        hidden = self.stack(self.embed(input_ids, positions), position_ids=positions, key_padding=attention_mask,
                            document_ids=document_ids, prefix_lengths=prefix_lengths, cache=cache)
        return self.head(hidden, self.output_weight(), return_hidden, head_loss)


class Seq2SeqLM(TesseraModel):
    """Encoder-decoder LM (T5-like): bidirectional encoder, causal decoder with cross-attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.encoder = Stack(cfg, cfg.n_layers, causal=False)
        self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross=True, layer_offset=cfg.n_layers)
        self.head = OutputHead(cfg, masked=False)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_length(input_ids.shape[1])
        positions = resolve_positions(input_ids, attention_mask, None, None)
        return self.encoder(self.embed(input_ids, positions), position_ids=positions, key_padding=attention_mask)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, *,
               attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
               return_hidden: bool = False, cache: KVCache | None = None,
               head_loss: HeadLoss | None = None) -> torch.Tensor:
        """Decoder logits given the encoder output ``memory`` (``attention_mask`` is the encoder's);
        ``return_hidden`` and ``head_loss`` as for :meth:`TransformerLM.forward`."""
        offset = cache.length(self.decoder.layers[0].attn.layer_id) if cache is not None else 0
        self.check_length(offset + decoder_input_ids.shape[1])
        positions = resolve_positions(decoder_input_ids, decoder_attention_mask, None, None, offset)
        hidden = self.decoder(self.embed(decoder_input_ids, positions), position_ids=positions,
                              key_padding=decoder_attention_mask, memory=memory, memory_padding=attention_mask,
                              cache=cache)
        return self.head(hidden, self.output_weight(), return_hidden, head_loss)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, *,
                attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                return_hidden: bool = False, head_loss: HeadLoss | None = None) -> torch.Tensor:
        """Logits [B, Td, V] (fp32); ``return_hidden`` and ``head_loss`` as for :meth:`TransformerLM.forward`."""
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask=attention_mask,
                           decoder_attention_mask=decoder_attention_mask, return_hidden=return_hidden,
                           head_loss=head_loss)


class SequenceClassifier(TesseraModel):
    """One stack + a linear score head: pooled at the last real token (decoder) or the first (encoder)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.stack = Stack(cfg, cfg.n_layers, causal=cfg.causal)
        self.score = nn.Linear(cfg.d_model, cfg.n_labels, bias=cfg.bias)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, n_labels] (fp32)."""
        self.check_length(input_ids.shape[1])
        positions = resolve_positions(input_ids, attention_mask, None, position_ids)
        hidden = self.stack(self.embed(input_ids, positions), position_ids=positions, key_padding=attention_mask)
        if not self.config.causal:
            pooled = hidden[:, 0]
        elif attention_mask is None:
            pooled = hidden[:, -1]
        else:
            index = torch.arange(hidden.shape[1], device=hidden.device) * attention_mask.long()
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index.argmax(dim=-1)]
        return self.score(pooled).float()

    def output_weight(self) -> torch.Tensor:
        raise UserError("a classifier model has no LM head")


def build_model(cfg: ModelConfig, head: str = "lm") -> TesseraModel:
    """The model for ``cfg`` with ``head`` "lm" (causal / masked / seq2seq LM by arch) or "classifier",
    on torch's default device, initialised by :meth:`~TesseraModel.init_weights` from torch's global
    RNG; under ``torch.device("meta")`` shapes only (no memory, no init: see ``materialize``)."""
    if head not in HEADS:
        raise UserError(f"unknown model head {head!r}; choose from {', '.join(HEADS)}")
    if head == "classifier" and cfg.arch == Arch.encoder_decoder:
        raise UserError("the classifier head needs arch=decoder or arch=encoder, not encoder_decoder")
    if head == "classifier":
        cls: type[TesseraModel] = SequenceClassifier
    else:
        cls = Seq2SeqLM if cfg.arch == Arch.encoder_decoder else TransformerLM
    device = torch.get_default_device()
    with torch.device("meta"):  # torch's own per-layer init would draw numbers init_weights then replaces
        model = cls(cfg)
    if device.type != "meta":
        model.materialize(device)
    return model
