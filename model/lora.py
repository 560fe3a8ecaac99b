"""LoRA: low-rank adapters on the linear layers of the blocks, the base weights frozen.

An adapter *site* is one projection as Hugging Face models name them: ``q``, ``k``, ``v``, ``o`` of
(self or cross) attention, ``gate``, ``up``, ``down`` of the MLP. Tessera fuses some of them into one
``nn.Linear`` (q/k/v → ``attn.qkv``, gate/up → ``mlp.up``), so a :class:`LoRALinear` carries one
adapter per adapted *part* (a block of its output rows) and adds ``scaling · B(A(dropout(x)))`` to
those rows only. Per site this is exactly PEFT's LoRA on the unfused projection, which is what lets
``tessera export`` write adapters that PEFT loads (``model.hf``).

Site names are the module path plus the part: ``stack.layers.0.attn.q``, ``decoder.layers.1.cross_attn.k``,
``stack.layers.3.mlp.gate``. A target matches a site when it equals the name, ends it after a dot
(``q``, ``attn.q``, ``layers.0.mlp.down``), or, holding ``*?[``, matches it as a glob; ``all-linear``
matches every site. A starts like PEFT's (Kaiming-uniform, or Gaussian), B at zero: step 0 is the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fnmatch
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.config import Config
from common.errors import ConfigError, UserError
from model.blocks import Block
from model.config import Mlp, ModelConfig

ALL_LINEAR = "all-linear"


class LoraQuantize(enum.StrEnum):
    none = "none"
    nf4 = "nf4"  # QLoRA: the frozen block linears in 4-bit NormalFloat (torchao), dequantised per matmul


class LoraInit(enum.StrEnum):
    kaiming = "kaiming"  # PEFT's default (init_lora_weights=True): A ~ kaiming_uniform(a=sqrt(5))
    gaussian = "gaussian"  # PEFT's "gaussian": A ~ N(0, 1/rank)


@dataclasses.dataclass
class LoraConfig(Config):
    """The ``lora`` section: rank 0 trains the whole model; rank > 0 freezes it and trains adapters."""

    rank: int = 0  # 0: off (full fine-tuning)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on each adapter's input
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])  # q k v o gate up down, glob, all-linear
    rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank (rank-stabilised LoRA)
    init: LoraInit = LoraInit.kaiming
    quantize: LoraQuantize = LoraQuantize.none  # nf4: QLoRA (single and ddp; needs torchao)

    @classmethod
    def preprocess(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        # the default targets are what every resolved config.yaml carries: only others mean "set"
        default = cls().targets
        if raw.get("targets", default) != default and not (isinstance(raw.get("rank"), int) and raw["rank"] > 0):
            raise ConfigError(f"{where}.targets is set but {where}.rank={raw.get('rank', 0)} (LoRA off); "
                              f"set {where}.rank to a positive integer")
        if isinstance(raw.get("targets"), str):
            raw["targets"] = [raw["targets"]]
        return super().preprocess(raw, where)

    def validate(self, where: str) -> None:
        if self.rank < 0:
            raise ConfigError(f"{where}.rank: must be >= 0 (0 = no LoRA), got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        if self.quantize != LoraQuantize.none and not self.rank:
            raise ConfigError(f"{where}.quantize={self.quantize} quantises the base LoRA adapts: set {where}.rank > 0")
        if self.rank and not self.targets:
            raise ConfigError(f"{where}.targets: empty; name the projections to adapt (e.g. [q, v] or [all-linear])")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def linear_parts(cfg: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """Per block linear (``parent.leaf``), its parts in output-row order: (site name, rows)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    mlp_up = (("gate", cfg.d_ff), ("up", cfg.d_ff)) if cfg.mlp != Mlp.gelu else (("up", cfg.d_ff),)
    return {
        "attn.qkv": (("q", q), ("k", kv), ("v", kv)),
        "attn.out": (("o", cfg.d_model),),
        "cross_attn.q": (("q", q),),
        "cross_attn.kv": (("k", kv), ("v", kv)),
        "cross_attn.out": (("o", cfg.d_model),),
        "mlp.up": mlp_up,
        "mlp.down": (("down", cfg.d_model),),
    }


def part_rows(parts: tuple[tuple[str, int], ...]) -> dict[str, slice]:
    """Each part's slice of the fused output rows."""
    out, start = {}, 0
    for name, rows in parts:
        out[name] = slice(start, start + rows)
        start += rows
    return out


class LowRank(nn.Module):
    """One adapter: ``B @ A`` of rank r. Its own module, so ZeRO-3 gathers A and B for its forward."""

    def __init__(self, in_features: int, out_features: int, rank: int, init: LoraInit,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.init = init
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
        return F.linear(F.linear(x, self.A) * scaling, self.B)  # scaled at rank r: one small temporary

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A as PEFT starts it, B zero (so the adapter adds nothing until trained)."""
        if self.A.is_meta:
            return
        if self.init == LoraInit.gaussian:
            nn.init.normal_(self.A, 0.0, 1.0 / self.A.shape[0], generator=generator)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.B)


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` (same ``weight``/``bias`` names) plus adapters on some of its parts."""

    def __init__(self, base: nn.Linear, parts: tuple[tuple[str, int], ...], adapted: list[str],
                 cfg: LoraConfig) -> None:
        with torch.device("meta"):
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        self.parts, self.scaling = parts, cfg.scaling
        rows = dict(parts)
        device, dtype = self.weight.device, self.weight.dtype
        self.lora = nn.ModuleDict({name: LowRank(self.in_features, rows[name], cfg.rank, cfg.init, device, dtype)
                                   for name, _ in parts if name in adapted})
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.merged = False
        self.disabled = False
        for adapter in self.lora.values():
            adapter.reset_adapter()  # on the meta device materialize() does it, from its seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return out
        pieces = [self.lora[name](self.dropout(x), self.scaling) if name in self.lora
                  else out.new_zeros(*out.shape[:-1], rows) for name, rows in self.parts]
        return out + (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1))

    def delta(self) -> torch.Tensor:
        """The weight update ``scaling · B @ A`` of every part ([out, in], zero rows where not adapted)."""
        delta = torch.zeros_like(self.weight)
        for name, rows in part_rows(self.parts).items():
            if name in self.lora:
                delta[rows] = self.scaling * (self.lora[name].B @ self.lora[name].A).to(delta.dtype)
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged and is_quantized(self.weight):
            raise UserError("a QLoRA model's base is 4-bit: merge the adapter into the unquantised base "
                            "(load the adapter directory again; it loads the base as saved)")
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta()
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora={list(self.lora)}, scaling={self.scaling:g}"


def _matches(site: str, target: str) -> bool:
    if target == ALL_LINEAR:
        return True
    if any(c in target for c in "*?["):
        return fnmatch.fnmatchcase(site, target)
    return site == target or site.endswith("." + target)


def adapter_sites(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Every site of ``model``: name → (module path of its linear, part name)."""
    parts = linear_parts(model.config)
    sites = {}
    for name, module in model.named_modules():
        key = ".".join(name.split(".")[-2:])
        if key in parts and isinstance(module, nn.Linear):
            parent = name.rsplit(".", 1)[0]
            for part, _ in parts[key]:
                sites[f"{parent}.{part}"] = (name, part)
    return sites


def apply_lora(model: nn.Module, cfg: LoraConfig, where: str = "lora") -> list[str]:
    """Freeze ``model`` and put adapters on the sites ``cfg.targets`` match (on the meta device too:
    ``materialize`` then initialises them); returns the adapted site names. A target that matches no
    site is a one-line ConfigError."""
    sites = adapter_sites(model)
    chosen = {}
    for target in cfg.targets:
        hits = [site for site in sites if _matches(site, target)]
        if not hits:
            example = ", ".join(sorted({s.rsplit(".", 1)[-1] for s in sites}))
            raise ConfigError(f"{where}.targets: {target!r} matches no module; sites are named like "
                              f"{next(iter(sites), '?')} (last parts: {example}) or {ALL_LINEAR}")
        chosen.update({site: sites[site] for site in hits})
    model.requires_grad_(False)
    parts_of = linear_parts(model.config)
    by_linear: dict[str, list[str]] = {}
    for linear, part in chosen.values():
        by_linear.setdefault(linear, []).append(part)
    for linear, adapted in by_linear.items():
        parent_name, leaf = linear.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        key = ".".join(linear.split(".")[-2:])
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), parts_of[key], adapted, cfg))
    model.lora_config = cfg
    return sorted(chosen)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key is an adapter tensor (``...lora.<part>.A`` / ``.B``)."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-3] == "lora" and parts[-1] in ("A", "B")


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference, export); :func:`unmerge` undoes it."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's outputs inside the block (e.g. DPO's reference), with no second copy of it."""
    layers = lora_layers(model)
    before = [layer.disabled for layer in layers]
    for layer in layers:
        if layer.merged:
            raise RuntimeError("adapters_disabled on a merged model: unmerge first")
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def merged_state(state: dict[str, torch.Tensor], cfg: ModelConfig, lora: LoraConfig) -> dict[str, torch.Tensor]:
    """A full state dict with its adapter tensors folded into the base weights (and dropped)."""
    out = {k: v for k, v in state.items() if not is_adapter_key(k)}
    parts = linear_parts(cfg)
    for key in [k for k in state if is_adapter_key(k) and k.endswith(".A")]:
        linear, part = key[: -len(".A")].rsplit(".lora.", 1)
        rows = part_rows(parts[".".join(linear.split(".")[-2:])])[part]
        weight = out[f"{linear}.weight"] = out[f"{linear}.weight"].clone()
        a, b = state[key], state[f"{key[:-2]}.B"]
        weight[rows] += (lora.scaling * (b.float() @ a.float())).to(weight.dtype)
    return out


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "NF4Tensor"


def quantize_base(model: nn.Module) -> int:
    """QLoRA (``lora.quantize=nf4``): every frozen linear of the blocks keeps its weight in NF4 (torchao's
    NF4Tensor, blocks of 64 with scales quantised in turn), the adapters stay as they are. Call it once
    the weights are loaded. Returns the bytes the base weights took before; a no-op without nf4."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None or cfg.quantize == LoraQuantize.none:
        return 0
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        raise UserError("lora.quantize=nf4 needs torchao (pip install torchao)") from None
    before = 0
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        for module in block.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, nn.Linear) or weight.requires_grad or is_quantized(weight):
                continue
            blocks_of_64 = weight.numel() // 64
            if weight.numel() % 64:
                continue  # NF4 needs whole blocks of 64: such a layer stays as it is
            scaler_block = next(d for d in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks_of_64 % d == 0)
            before += weight.numel() * weight.element_size()
            module.weight = nn.Parameter(to_nf4(weight.detach().contiguous(), 64, scaler_block), requires_grad=False)
    return before


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (shapes only: works on the meta device)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
