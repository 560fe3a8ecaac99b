"""``ModelConfig``: one typed description of every Transformer variant Tessera builds.

Presets (``model/presets.py``) are named starting points; keys given beside ``preset`` override it.
``validate`` refuses combinations that cannot work, with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from common.config import Config
from common.errors import ConfigError


class Arch(enum.StrEnum):
    decoder = "decoder"
    encoder = "encoder"
    encoder_decoder = "encoder_decoder"


class Pos(enum.StrEnum):
    learned = "learned"
    sinusoidal = "sinusoidal"
    rope = "rope"
    alibi = "alibi"
    t5_bias = "t5_bias"
    none = "none"


# encodings whose tables (or rotation caches) are sized by max_seq_len: see ModelConfig.covers
SIZED_BY_MAX_SEQ_LEN = frozenset({Pos.learned, Pos.sinusoidal, Pos.rope})


class Norm(enum.StrEnum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class NormPosition(enum.StrEnum):
    pre = "pre"
    post = "post"


class Mlp(enum.StrEnum):
    gelu = "gelu"
    swiglu = "swiglu"
    geglu = "geglu"


class RouterGating(enum.StrEnum):
    softmax = "softmax"  # Mixtral, Qwen-MoE: softmax over all experts, then top-k
    sigmoid = "sigmoid"  # DeepSeek-V3: an independent sigmoid score per expert, then top-k


class Attn(enum.StrEnum):
    auto = "auto"  # sdpa, or compiled flex on CUDA where a mask or score bias would leave SDPA's fused kernels
    eager = "eager"
    sdpa = "sdpa"
    flex = "flex"


class InitScheme(enum.StrEnum):
    normal = "normal"  # N(0, init_std), residual output projections / sqrt(2 * blocks) (GPT-2, Megatron)
    t5 = "t5"  # T5's fan-in scales (mesh-tensorflow, transformers): see TesseraModel.init_weights


class Kernels(enum.StrEnum):
    torch = "torch"
    liger = "liger"


@dataclasses.dataclass
class ModelConfig(Config):
    """Shape and choices of a Transformer. ``head_dim`` is ``attn_head_dim`` or ``d_model // n_heads``.

    Refused combinations: pos=none outside arch=decoder (nothing would tell positions apart);
    pos=alibi with encoder_decoder (cross-attention has no distance); sliding_window outside
    arch=decoder; attn=flex with dropout > 0 (FlexAttention has no attention dropout). ALiBi in an
    encoder is symmetric (-slope·|i-j|); t5_bias is bidirectional in encoders, causal in decoders.
    """

    preset: str | None = None
    arch: Arch = Arch.decoder
    vocab_size: int = 8192
    d_model: int = 64
    n_layers: int = 2
    n_decoder_layers: int | None = None  # encoder_decoder only; None means n_layers
    n_heads: int = 4
    n_kv_heads: int | None = None  # None means n_heads (MHA); 1 is MQA
    attn_head_dim: int | None = None  # None means d_model // n_heads (Qwen3, Mistral-Nemo set their own)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    d_ff: int = 256
    max_seq_len: int = 1024
    pos: Pos = Pos.rope
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama 3.1 frequency scaling ("llama3" rope type); None = off
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    norm: Norm = Norm.rmsnorm
    norm_eps: float = 1e-5
    norm_position: NormPosition = NormPosition.pre
    mlp: Mlp = Mlp.swiglu
    gelu_tanh: bool = False  # tanh approximation of GELU (GPT-2 "gelu_new", T5 v1.1 "gated-gelu")
    attn: Attn = Attn.auto
    kernels: Kernels = Kernels.torch  # liger: Liger-Kernel for norm/GLU/RoPE/linear+CE on CUDA (model/kernels.py)
    attn_scale: float | None = None  # None means 1/sqrt(head_dim); T5 uses 1.0
    sliding_window: int | None = None  # a query sees itself and the window-1 keys before it
    tie_embeddings: bool = True
    scale_output: bool = False  # multiply final hidden states by d_model**-0.5 before the LM head (original T5)
    bias: bool = False  # biases of linear layers and LayerNorm
    qkv_bias: bool = False  # biases on the query/key/value projections even when bias is false (Qwen2)
    dropout: float = 0.0
    init_std: float = 0.02  # init_scheme=normal's spread
    init_scheme: InitScheme = InitScheme.normal  # t5: T5's fan-in scales (the T5 presets)
    n_labels: int = 1  # outputs of the classifier / reward head
    n_experts: int = 0  # > 0: every block's MLP is a Mixture-of-Experts (model/moe.py)
    experts_per_token: int = 2  # top-k experts each token is routed to
    moe_d_ff: int | None = None  # hidden size of one expert; None means d_ff
    shared_expert_d_ff: int = 0  # > 0: a dense MLP of this size that every token also passes through
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output scaled by sigmoid(linear(x))
    moe_capacity_factor: float | None = None  # None: dropless; else an expert keeps its best cf·N·k/E assignments
    router_gating: RouterGating = RouterGating.softmax
    router_norm_topk: bool = True  # renormalise the k chosen weights to sum to 1 (Mixtral; Qwen's norm_topk_prob)
    router_aux_loss_coef: float = 0.01  # load-balancing loss (Switch Transformer form), added to the training loss
    router_z_loss_coef: float = 0.0  # router z-loss (ST-MoE): mean squared logsumexp of the router logits
    router_bias_update_rate: float = 0.0  # > 0: aux-loss-free balancing (DeepSeek-V3), per-expert bias step size
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    def covers(self, length: int) -> bool:
        """Whether the positions reach a sequence of ``length`` tokens: the tables (learned, sinusoidal)
        and RoPE caches stop at max_seq_len; ALiBi, T5 bias and none have no limit."""
        return length <= self.max_seq_len or self.pos not in SIZED_BY_MAX_SEQ_LEN

    @property
    def causal(self) -> bool:
        """Whether the main stack (the only one, or the encoder of encoder_decoder) is causal."""
        return self.arch == Arch.decoder

    @classmethod
    def preprocess(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        from model.presets import PRESETS

        name = raw.get("preset")
        if name is None:
            return raw
        if name not in PRESETS:
            key = f"{where}.preset" if where else "preset"
            raise ConfigError(f"{key}: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return {**PRESETS[name], **raw}

    def validate(self, where: str) -> None:
        def fail(key: str, message: str) -> None:
            raise ConfigError(f"{where}.{key}: {message}" if where else f"{key}: {message}")

        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "n_labels"):
            if getattr(self, key) < 1:
                fail(key, f"must be at least 1, got {getattr(self, key)}")
        if self.attn_head_dim is None and self.d_model % self.n_heads:
            fail("n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads} "
                 "(or set attn_head_dim)")
        if self.attn_head_dim is not None and self.attn_head_dim < 1:
            fail("attn_head_dim", f"must be at least 1 (or unset), got {self.attn_head_dim}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            fail("n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.n_decoder_layers is not None and self.arch != Arch.encoder_decoder:
            fail("n_decoder_layers", "only arch=encoder_decoder has a separate decoder stack")
        if self.n_decoder_layers is not None and self.n_decoder_layers < 1:
            fail("n_decoder_layers", f"must be at least 1, got {self.n_decoder_layers}")
        if self.pos == Pos.rope and self.head_dim % 2:
            fail("pos", f"rope needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling_factor is not None:
            if self.pos != Pos.rope:
                fail("rope_scaling_factor", f"scales RoPE frequencies; pos is {self.pos}")
            if self.rope_scaling_factor <= 0 or self.rope_high_freq_factor <= self.rope_low_freq_factor:
                fail("rope_scaling_factor", "needs factor > 0 and rope_high_freq_factor > rope_low_freq_factor")
        if self.pos == Pos.sinusoidal and self.d_model % 2:
            fail("pos", f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.pos == Pos.none and self.arch != Arch.decoder:
            fail("pos", f"pos=none leaves arch={self.arch} without any order information; use a position encoding")
        if self.pos == Pos.alibi and self.arch == Arch.encoder_decoder:
            fail("pos", "alibi is not defined for encoder_decoder (cross-attention has no distance); use t5_bias")
        if self.pos == Pos.t5_bias and (self.t5_num_buckets < 2 or self.t5_max_distance < 2):
            fail("t5_num_buckets", "t5_bias needs t5_num_buckets >= 2 and t5_max_distance >= 2")
        if self.sliding_window is not None:
            if self.arch != Arch.decoder:
                fail("sliding_window", f"only arch=decoder (causal) supports a sliding window, not {self.arch}")
            if self.sliding_window < 1:
                fail("sliding_window", f"must be at least 1, got {self.sliding_window}")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.attn == Attn.flex and self.dropout > 0:
            fail("attn", "flex attention has no attention dropout; set dropout=0 or attn=sdpa")
        if self.norm_eps <= 0:
            fail("norm_eps", f"must be positive, got {self.norm_eps}")
        if self.init_std <= 0:
            fail("init_std", f"must be positive, got {self.init_std}")
        if self.n_experts < 0:
            fail("n_experts", f"must be 0 (dense MLP) or a number of experts, got {self.n_experts}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            fail("experts_per_token", f"must be in [1, n_experts={self.n_experts}], got {self.experts_per_token}")
        if self.n_experts and self.bias:
            fail("n_experts", "experts have no biases; set bias=false for a Mixture-of-Experts model")
        if (self.moe_d_ff is not None and self.moe_d_ff < 1) or self.shared_expert_d_ff < 0:
            fail("moe_d_ff", "moe_d_ff must be at least 1 (or unset) and shared_expert_d_ff at least 0")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            fail("moe_capacity_factor", f"must be > 0 (or unset: dropless), got {self.moe_capacity_factor}")
        if self.shared_expert_gate and not self.shared_expert_d_ff:
            fail("shared_expert_gate", "gates the shared expert; set shared_expert_d_ff > 0")
        if self.router_bias_update_rate < 0 or (self.router_bias_update_rate and not self.n_experts):
            fail("router_bias_update_rate", "must be >= 0, and > 0 only for a Mixture-of-Experts model")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            fail("router_aux_loss_coef", "router_aux_loss_coef and router_z_loss_coef must be >= 0")
        if not 0 <= self.pad_token_id < self.vocab_size:
            fail("pad_token_id", f"must be a token id below vocab_size={self.vocab_size}")
