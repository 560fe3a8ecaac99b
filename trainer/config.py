"""RunConfig: everything one training run reads, in sections model/data/train/checkpoint/log/align/lora/parallel.

Load it with ``common.config.load_config(RunConfig, path, overrides)``. Checks that need the
command (:meth:`RunConfig.check_task`) happen as it starts, before the rendezvous; those that need
the world size (global batch divisibility) in :func:`trainer.run.run`, once it is known.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import ConfigError, UserError
from data.config import DataConfig
from model.config import Arch, Attn, ModelConfig, Pos
from model.lora import LoraConfig
from trainer.objectives import OBJECTIVES, TASKS, ObjectiveName, objective_name
from trainer.objectives.policy_gradient import LossAggregation


class StrategyName(enum.StrEnum):
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    zero1 = "zero1"
    zero2 = "zero2"
    zero3 = "zero3"

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage for zero1/2/3; None for the strategies that are not DeepSpeed."""
        return {"zero1": 1, "zero2": 2, "zero3": 3}.get(self.value)

    @property
    def shards_parameters(self) -> bool:
        """Each rank holds a slice of the weights, so every forward is collective (fsdp, zero3)."""
        return self in (StrategyName.fsdp, StrategyName.zero3)


class Schedule(enum.StrEnum):
    cosine = "cosine"
    linear = "linear"
    wsd = "wsd"  # warmup, stable, then decay over the last decay_fraction of the steps
    constant = "constant"


class Precision(enum.StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"


class ActivationCheckpointing(enum.StrEnum):
    """Activation checkpointing per block; trainer/strategy/prepare.py says what each keeps."""

    none = "none"
    full = "full"
    selective = "selective"


class PipelineSchedule(enum.StrEnum):
    """torch.distributed.pipelining's schedules (``get_schedule_class`` names) that parallel.pp runs: one
    stage per pp rank (GPipe, 1F1B) or two (looped: Interleaved1F1B, LoopedBFS, InterleavedZeroBubble;
    V-shaped: ZBVZeroBubble, DualPipeV)."""

    gpipe = "GPipe"
    one_f_one_b = "1F1B"
    interleaved_1f1b = "Interleaved1F1B"
    looped_bfs = "LoopedBFS"
    interleaved_zero_bubble = "InterleavedZeroBubble"
    zbv_zero_bubble = "ZBVZeroBubble"
    dual_pipe_v = "DualPipeV"

    @property
    def stages_per_rank(self) -> int:
        return 1 if self in (PipelineSchedule.gpipe, PipelineSchedule.one_f_one_b) else 2


class Offload(enum.StrEnum):
    none = "none"
    optimizer = "optimizer"
    optimizer_params = "optimizer+params"


@dataclasses.dataclass
class RunModelConfig(ModelConfig):
    """The model section: a ModelConfig plus ``init``, a checkpoint or HF directory to start from."""

    init: Path | None = None
    vocab_from_tokenizer: bool = True  # set vocab_size to the tokenizer's (false when vocab_size is given)

    @classmethod
    def preprocess(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        if "vocab_size" in raw:
            raw.setdefault("vocab_from_tokenizer", False)
        return super().preprocess(raw, where)

    def model_config(self) -> ModelConfig:
        """The architecture alone, as ``model.build_model`` and ``model.yaml`` take it."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**fields)


@dataclasses.dataclass
class TrainConfig(Config):
    strategy: StrategyName = StrategyName.single
    micro_batch_size: int = 8
    global_batch_size: int | None = None  # None: micro_batch_size × ranks (no accumulation)
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: Schedule = Schedule.cosine
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying at the end
    weight_decay: float = 0.1
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    precision: Precision = Precision.fp32
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none  # true = full
    compile: bool = False
    seed: int = 0
    eval_every: int = 0  # 0: no evaluation
    eval_steps: int = 20
    eval_tasks: list[str] = dataclasses.field(default_factory=list)  # multiple-choice jsonl files: eval/<stem>/acc
    max_bad_steps: int = 10  # stop after this many skipped (NaN/inf or spiking) steps
    spike_factor: float = 0.0  # skip a step whose loss exceeds this × the running mean; 0 disables
    offload: Offload = Offload.none
    hsdp: bool = False  # fsdp: shard within a node, replicate across nodes
    deepspeed_config: Path | None = None  # the user's own ds_config JSON (zero*), checked against ours
    objective: ObjectiveName | None = None  # unset: what the command and model.arch imply; else one of the command's
    loss_chunk_size: int = 4096  # rows per chunk of the linear+CE; 0 computes full logits
    dist_timeout_s: int = 600

    @classmethod
    def preprocess(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        checkpointing = raw.get("activation_checkpointing")
        if isinstance(checkpointing, bool):  # the older boolean form
            raw["activation_checkpointing"] = "full" if checkpointing else "none"
        return super().preprocess(raw, where)

    def validate(self, where: str) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{where}.{key}: {why}")

        for key in ("micro_batch_size", "max_steps"):
            if getattr(self, key) < 1:
                raise bad(key, "must be at least 1")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise bad("global_batch_size", f"must be at least 1 (or unset: micro_batch_size × ranks), "
                      f"got {self.global_batch_size}")
        if self.global_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise bad(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}",
            )
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise bad("lr", f"need 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        for key in ("warmup_steps", "eval_every"):
            if getattr(self, key) < 0:
                raise bad(key, f"must not be negative, got {getattr(self, key)}")
        for task in self.eval_tasks:
            if not Path(task).is_file():
                raise bad("eval_tasks", f"no such file: {task} (multiple-choice jsonl, as tessera eval --tasks reads)")
        stems = [Path(task).stem for task in self.eval_tasks]
        if len(set(stems)) < len(stems):
            raise bad("eval_tasks", f"two files share a name, so their eval/<name>/acc would too: {self.eval_tasks}")
        if not 0 < self.decay_fraction <= 1:
            raise bad("decay_fraction", "must be in (0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", f"expected two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0 or self.spike_factor < 0 or self.loss_chunk_size < 0:
            raise bad("grad_clip", "grad_clip, spike_factor and loss_chunk_size must be >= 0")
        if self.offload is not Offload.none and self.strategy in (StrategyName.single, StrategyName.ddp):
            raise bad("offload", f"needs strategy fsdp or zero1/2/3, not {self.strategy}")
        if self.offload is Offload.optimizer_params and self.strategy in (StrategyName.zero1, StrategyName.zero2):
            raise bad("offload", "parameter offload needs zero3 or fsdp")
        if self.deepspeed_config is not None and self.strategy.zero_stage is None:
            raise bad("deepspeed_config", f"only used by zero1/zero2/zero3, not {self.strategy}")
        if self.hsdp and self.strategy is not StrategyName.fsdp:
            raise bad("hsdp", "only applies to strategy fsdp")


@dataclasses.dataclass
class ParallelConfig(Config):
    """Dimensions beyond data parallelism; data parallel takes the rest of the world. Supported now,
    one at a time: ``tp`` (Megatron-style tensor parallel of dense blocks, optionally sequence
    parallel; dp as ddp or FSDP2), ``ep`` (MoE experts split over ranks; dp as ddp or FSDP2), ``pp`` (a
    decoder's blocks in pipeline stages, trainer/strategy/pipeline_parallel.py; dp as ddp) and ``cp``
    (each sequence split over ranks, attention over all-gathered keys and values,
    trainer/strategy/context_parallel.py; dp as ddp or FSDP2)."""

    tp: int = 1  # tensor parallel: ranks each block's heads and MLP units are split over (they share a batch)
    pp: int = 1  # pipeline parallel: ranks a decoder's blocks are staged over (they share a batch)
    pp_schedule: PipelineSchedule = PipelineSchedule.one_f_one_b  # multi-stage schedules: 2 stages per pp rank
    cp: int = 1  # context parallel: ranks each sequence is split over (they share a batch)
    ep: int = 1  # expert parallel: ranks each MoE layer's experts are split over (divides ranks and n_experts)
    sequence_parallel: bool = False  # with tp: norms and residuals on 1/tp of the sequence (Megatron-SP)
    vocab_parallel: bool = True  # with tp: embedding and LM head rows split, the loss from vocab-sharded logits

    def validate(self, where: str) -> None:
        for key in ("tp", "pp", "cp", "ep"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: must be at least 1, got {getattr(self, key)}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(f"{where}.sequence_parallel splits tensor parallel's activations: set {where}.tp > 1")
        beyond = [f"{where}.{key}" for key in ("tp", "pp", "cp", "ep") if getattr(self, key) > 1]
        if len(beyond) > 1:
            raise ConfigError(f"{' and '.join(beyond)}: one at a time for now (tp splits dense blocks, pp stages "
                              "them, cp splits sequences, ep splits the experts of MoE ones)")

    def check_model(self, model: ModelConfig) -> None:
        """What tp, pp, cp and ep cannot split in ``model``, refused before its weights exist: at load when
        the model section is the model, else (model.init) on the loaded config. The strategies' ranks and
        micro-batch checks need the world and wait for the run."""
        tp, pp, cp, ep = self.tp, self.pp, self.cp, self.ep
        biases = model.pos in (Pos.alibi, Pos.t5_bias)
        if tp > 1 and (model.n_heads % tp or model.kv_heads % tp or model.d_ff % tp):
            raise ConfigError(f"parallel.tp={tp} must divide model.n_heads={model.n_heads}, the kv heads "
                              f"({model.kv_heads}) and model.d_ff={model.d_ff}")
        if tp > 1 and (model.n_experts or biases):
            raise ConfigError("parallel.tp splits attention heads and dense MLPs: not for MoE models or per-head "
                              f"score biases (model.pos={model.pos})")
        if pp > 1 and not model.causal:
            raise ConfigError("parallel.pp cuts a decoder (model.arch=decoder, an LM head) into stages; "
                              "encoders, encoder-decoders and classifiers are not supported")
        if pp > 1 and model.n_experts and model.router_bias_update_rate:
            raise ConfigError("parallel.pp with model.router_bias_update_rate > 0 is not supported (the expert "
                              "biases balance over every MoE layer at once); use router_aux_loss_coef")
        if pp > 1 and pp * self.pp_schedule.stages_per_rank > model.n_layers:
            raise ConfigError(f"parallel.pp={pp} with {self.pp_schedule} makes {pp * self.pp_schedule.stages_per_rank} "
                              f"stages, more than model.n_layers={model.n_layers}")
        if cp > 1 and (model.arch != Arch.decoder or model.n_experts):
            raise ConfigError(f"parallel.cp splits the sequences of a dense decoder, not model.arch={model.arch}"
                              + (" with experts" if model.n_experts else ""))
        if cp > 1 and (biases or model.attn == Attn.flex):
            raise ConfigError(f"parallel.cp masks eager or SDPA attention (model.attn=auto, sdpa or eager), not model."
                              f"attn={model.attn} with model.pos={model.pos} (score biases and flex wait for a GPU)")
        if ep > 1 and (not model.n_experts or model.n_experts % ep):
            raise ConfigError(f"parallel.ep={ep} shards the experts: the model's n_experts={model.n_experts} "
                              "must be a positive multiple of it")


@dataclasses.dataclass
class CheckpointConfig(Config):
    dir: Path | None = None  # None: <log.dir>/checkpoints
    every: int = 0  # save every N steps (0: only at the end and on preemption)
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in dir, if any), never, or a checkpoint path
    save_final: bool = True

    def validate(self, where: str) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ConfigError(f"{where}: every must be >= 0 and keep_last >= 1")
        if self.dir is not None:
            check_directory(self.dir, f"{where}.dir")


@dataclasses.dataclass
class LogConfig(Config):
    dir: Path = Path("runs/default")
    every: int = 1
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "tessera"
    wandb_run_name: str | None = None
    wandb_group: str | None = None
    wandb_tags: list[str] = dataclasses.field(default_factory=list)
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs are looked up
    tensorboard: bool = False  # TensorBoard event files in <log.dir>/tensorboard, the metrics.jsonl names

    def validate(self, where: str) -> None:
        if self.every < 1:
            raise ConfigError(f"{where}.every: must be at least 1 (log every N steps), got {self.every}")
        check_directory(self.dir, f"{where}.dir")


def check_directory(path: Path, key: str) -> None:
    """A directory the run creates or reuses: anything but an existing non-directory."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} exists and is not a directory; name a directory")


class AlignLoss(enum.StrEnum):
    dpo = "dpo"
    ipo = "ipo"
    cdpo = "cdpo"
    simpo = "simpo"
    orpo = "orpo"
    grpo = "grpo"
    rloo = "rloo"
    online_dpo = "online_dpo"
    kto = "kto"
    ppo = "ppo"

    @property
    def online(self) -> bool:
        """Trained on completions sampled from the policy during the run (prompt shards, rewards)."""
        return self in (AlignLoss.grpo, AlignLoss.rloo, AlignLoss.online_dpo, AlignLoss.ppo)

    @property
    def objective(self) -> ObjectiveName:
        if self is AlignLoss.kto:
            return ObjectiveName.kto
        if self is AlignLoss.ppo:
            return ObjectiveName.ppo
        return ObjectiveName.online if self.online else ObjectiveName.preference


class Reference(enum.StrEnum):
    precomputed = "precomputed"
    live = "live"


class ScaleRewards(enum.StrEnum):
    """GRPO's advantage scaling (TRL's ``scale_rewards``): by the group's std, or none (Dr. GRPO)."""

    group = "group"
    none = "none"


@dataclasses.dataclass
class AlignConfig(Config):
    loss: AlignLoss = AlignLoss.dpo
    beta: float = 0.1  # DPO's temperature; for grpo/rloo/ppo the KL coefficient (0: no reference model)
    label_smoothing: float = 0.0  # cdpo
    simpo_gamma: float = 0.5
    orpo_alpha: float = 1.0
    reference: Reference = Reference.live
    desirable_weight: float = 1.0  # kto: weights of the desirable and undesirable examples' losses
    undesirable_weight: float = 1.0
    # online losses (grpo, rloo): rollouts, rewards and the clipped objective; TRL's names
    reward: list[str] = dataclasses.field(default_factory=list)  # exact_match, boxed, regex:P, module:f, RM dir
    reward_weights: list[float] = dataclasses.field(default_factory=list)  # empty: 1 each
    num_generations: int = 8  # completions per prompt (G); train.micro_batch_size counts prompts
    max_new_tokens: int = 64  # completion length; prompts keep their last data.seq_len tokens
    temperature: float = 1.0  # of sampling; the loss divides the logits by it too, as TRL does
    top_p: float = 1.0
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon; DAPO recommends 0.28
    loss_aggregation: LossAggregation = LossAggregation.dapo  # grpo's normaliser (TRL's loss_type)
    scale_rewards: ScaleRewards = ScaleRewards.group  # grpo
    normalize_advantages: bool = False  # rloo
    num_iterations: int = 1  # updates per rollout (TRL's μ; PPO's epochs); > 1 makes the ratio and its clip matter
    # ppo: a value head on the policy's hidden states, GAE, a clipped value loss (TRL's PPOConfig names)
    gamma: float = 1.0  # discount of the per-token rewards
    lam: float = 0.95  # GAE's λ
    cliprange_value: float = 0.2  # the value prediction is clipped to the rollout's value ± this
    vf_coef: float = 0.1  # weight of the value loss in the loss
    value_lr: float | None = None  # the value head's learning rate (on the run's schedule); None: train.lr

    @classmethod
    def preprocess(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        if isinstance(raw.get("reward"), str):  # align.reward=exact_match names one
            raw["reward"] = [raw["reward"]]
        return super().preprocess(raw, where)

    def validate(self, where: str) -> None:
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError(f"{where}.desirable_weight and undesirable_weight must be > 0, got "
                              f"{self.desirable_weight} and {self.undesirable_weight}")
        if not self.loss.online:
            return

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{where}.{key}: {why} (align.loss={self.loss})")

        if self.loss is AlignLoss.ppo:
            if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
                raise bad("gamma", f"gamma and lam must lie in [0, 1], got {self.gamma} and {self.lam}")
            if self.cliprange_value <= 0 or self.vf_coef < 0 or (self.value_lr is not None and self.value_lr <= 0):
                raise bad("cliprange_value", f"need cliprange_value > 0, vf_coef >= 0 and value_lr > 0, got "
                                             f"{self.cliprange_value}, {self.vf_coef} and {self.value_lr}")
        if self.num_generations < 1 or (self.num_generations < 2 and self.loss is not AlignLoss.ppo):
            raise bad("num_generations", f"must be at least 2 to compare completions of a prompt (1 for ppo), "
                                         f"got {self.num_generations}")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be at least 1")
        if self.num_iterations < 1:
            raise bad("num_iterations", f"must be at least 1, got {self.num_iterations}")
        if self.temperature <= 0:
            raise bad("temperature", f"must be > 0: the completions of a prompt must differ, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise bad("epsilon", f"need 0 < epsilon < 1 and epsilon_high > 0, got {self.epsilon}, {self.epsilon_high}")
        if self.beta < 0 or (self.loss is AlignLoss.online_dpo and self.beta == 0):
            raise bad("beta", f"must be >= 0 (the KL coefficient; > 0 for online_dpo), got {self.beta}")
        if self.loss is AlignLoss.online_dpo and self.num_generations != 2:
            raise bad("num_generations", f"online_dpo samples one pair per prompt: 2, not {self.num_generations}")
        if not self.reward:
            raise bad("reward", "name at least one reward: exact_match, boxed, regex:PATTERN or module:function")
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise bad("reward_weights", f"{len(self.reward_weights)} weights for {len(self.reward)} rewards")
        if self.reference is Reference.precomputed and self.beta:
            raise bad("reference", "online completions are new every step: the reference must be live")


@dataclasses.dataclass
class RunConfig(Config):
    model: RunModelConfig = dataclasses.field(default_factory=RunModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # model/lora.py
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

    @classmethod
    def preprocess(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        if "sft" in raw and not raw["sft"]:  # an empty section that resolved configs of earlier versions hold
            del raw["sft"]
        return super().preprocess(raw, where)

    def validate(self, where: str) -> None:
        native = (StrategyName.ddp, StrategyName.fsdp)
        for key, strategies in (("ep", native), ("tp", native), ("pp", (StrategyName.ddp,)), ("cp", native)):
            size = getattr(self.parallel, key)
            if size > 1 and self.train.strategy not in strategies:
                raise ConfigError(f"parallel.{key}={size} runs with train.strategy={' or '.join(strategies)} "
                                  f"over the data-parallel ranks, not {self.train.strategy}")
            if size > 1 and self.lora.enabled:
                raise ConfigError(f"parallel.{key}={size} with lora is not supported yet; drop one of them")
        objective = self.train.objective
        if objective is not None:
            chosen_by = [str(loss) for loss in AlignLoss if loss.objective is objective]
            if chosen_by and objective is not self.align.loss.objective:
                raise ConfigError(f"train.objective={objective} disagrees with align.loss={self.align.loss}, which "
                                  f"trains {self.align.loss.objective}: set align.loss to {' or '.join(chosen_by)} "
                                  "and leave train.objective unset")
            self.check_parallel_objective(objective, "")
        pp, per_step = self.parallel.pp, (self.train.global_batch_size or 0) // self.train.micro_batch_size
        if pp > 1 and per_step < pp:  # the exact count needs the data-parallel ranks: the strategy checks it
            raise ConfigError(f"parallel.pp={pp} needs at least {pp} micro-batches per step to fill the pipeline: "
                              f"set train.global_batch_size to at least {pp} × micro_batch_size × data-parallel "
                              f"ranks (micro_batch_size={self.train.micro_batch_size})")
        cp = self.parallel.cp
        if cp > 1 and self.data.seq_len % (2 * cp):
            raise ConfigError(f"parallel.cp={cp} cuts each sequence into {2 * cp} chunks: data.seq_len="
                              f"{self.data.seq_len} must be a multiple of {2 * cp}")
        if cp > 1 and self.train.hsdp:
            raise ConfigError(f"parallel.cp={cp} with train.hsdp is not supported: fsdp shards over all dp × cp "
                              "ranks; drop train.hsdp")
        if cp > 1 and self.train.compile:
            raise ConfigError(f"parallel.cp={cp} with train.compile is not supported yet; drop one of them")
        tp = self.parallel.tp
        for key in ("tp", "ep"):
            if getattr(self.parallel, key) > 1 and self.train.hsdp:
                raise ConfigError(f"parallel.{key}={getattr(self.parallel, key)} with train.hsdp is not supported: "
                                  f"fsdp shards over the data-parallel ranks of the (dp, {key}) mesh; drop train.hsdp")
        if self.parallel.sequence_parallel and self.data.seq_len % tp:
            raise ConfigError(f"parallel.sequence_parallel splits each sequence over parallel.tp={tp} ranks: "
                              f"data.seq_len={self.data.seq_len} must be a multiple of it")
        if self.lora.quantize != "none" and self.train.strategy not in (StrategyName.single, StrategyName.ddp):
            raise ConfigError(f"lora.quantize={self.lora.quantize} runs under train.strategy single or ddp, not "
                              f"{self.train.strategy} (sharding NF4 weights is not wired)")
        if self.lora.enabled and self.model.init is None:
            raise ConfigError("lora.rank > 0 adapts a pretrained model: set model.init to its checkpoint "
                              "or Hugging Face directory")
        if self.model.init is None:  # else the loaded model's, in trainer.run before its weights
            self.parallel.check_model(self.model)
        if self.model.init is None and not self.model.covers(self.data.seq_len):
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )

    def check_task(self, task: str) -> None:
        """The refusals that need the command (tessera pretrain|sft|align), made before any work: the
        objective it trains (train.objective, or what the task implies) must be one of the task's and
        one the parallel section can split."""
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        name = objective_name(self, task)
        trained_by = OBJECTIVES[name].task
        if trained_by != task:
            valid = ", ".join(str(n) for n, spec in OBJECTIVES.items() if spec.task == task)
            raise ConfigError(f"train.objective={name} is trained by tessera {trained_by}, not tessera {task} "
                              f"(whose objectives are {valid}); run tessera {trained_by} or change train.objective")
        if self.train.objective is None:
            implied = {"pretrain": f"model.arch={self.model.arch}", "sft": "tessera sft",
                       "align": f"align.loss={self.align.loss}"}[task]
            self.check_parallel_objective(name, f" (the objective of {implied})")

    def check_parallel_objective(self, objective: ObjectiveName, why: str) -> None:
        """pp and cp split a decoder's next-token loss only (``why`` says where ``objective`` came from)."""
        for key in ("pp", "cp"):
            size = getattr(self.parallel, key)
            if size > 1 and objective not in (ObjectiveName.clm, ObjectiveName.sft):
                raise ConfigError(f"parallel.{key}={size} trains train.objective=clm or sft, not {objective}{why}; "
                                  f"set parallel.{key}=1 to train it")

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoint.dir or self.log.dir / "checkpoints"
