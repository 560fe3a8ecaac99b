"""Pipeline parallel (``parallel.pp`` > 1, with train.strategy=ddp) over ``torch.distributed.pipelining``.

A decoder's blocks are cut into ``pp · v`` stages (``v`` = 1 for single-stage schedules such as 1F1B,
2 for multi-stage ones such as Interleaved1F1B); stage ``i`` runs on pp rank ``i % pp``, or for the
V-shaped schedules (ZBVZeroBubble) on rank ``i`` and ``2·pp-1-i`` (:func:`stage_ranks`). As torchtitan's
``_generate_llm_fqn_per_model_part`` (torchtitan/distributed/pipeline_parallel.py), the embeddings and
the final norm + head each weigh one block and the blocks are spread evenly. A stage is a view of the
unmodified ``model/`` modules under the plain model's parameter names, so checkpoints hold unsplit names:
a pp run resumes at pp=1 (or another pp) and the other way round. Each rank keeps only its stages'
tensors: the model is initialised block by block as everywhere else, another rank's block dropped as
soon as it is made. Tied embeddings live on the first stage and, as a copy, on the last: the two sum
their gradients (Megatron's embedding group) and so stay equal.

The ranks of a pipeline read the same micro-batches (the mesh is (dp, pp), pp inner); the loop's
gradient accumulation becomes the schedule's micro-batches. The objective is the next-token loss of
pretraining (clm) or of SFT (its labels only on assistant tokens); as the stages keep the shapes of their
first step, SFT's micro-batches are right-padded to data.seq_len. MoE blocks' router losses never reach the
last stage: each stage adds its own to its backward (:class:`StageRouters`). Every stage gets the resolved position ids
and the document ids / padding mask as keyword inputs; the last one computes the summed loss (its head
inside the loss, as the model's ``head_loss``) times the loop's ``world / global_count``, so gradients
are those of the single-process run (``scale_grads=False``). Gradients are averaged over dp, their norm
is the root of the pp-summed squares of each rank's stages, and the loss metric comes from the last stage.
Evaluation runs forward only through the stages in order (:class:`RankStages`), without a schedule.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    ScheduleDualPipeV,
    ScheduleZBVZeroBubble,
    get_schedule_class,
)

from common.errors import ConfigError
from model.moe import MoE, RouterStats, moe_layers, pop_router_stats
from model.transformer import HeadLoss, TransformerLM, resolve_positions
from trainer.config import ParallelConfig, PipelineSchedule
from trainer.distributed import device_mesh, to_device
from trainer.metrics import MetricSums
from trainer.objectives import Batch, LossOutput
from trainer.objectives.cross_entropy import IGNORE_INDEX, cross_entropy_sum, head_cross_entropy
from trainer.strategy import materialize
from trainer.strategy.optim import build_adamw, clip_and_step
from trainer.strategy.prepare import prepare
from trainer.strategy.single import TRAINED, Single


def stage_blocks(n_blocks: int, n_stages: int) -> list[range]:
    """The blocks of each of ``n_stages`` (2 to ``n_blocks``) stages: the embeddings and the norm + head
    count as one block each, the ``n_blocks + 2`` units are spread evenly, earlier stages taking the
    remainder (torchtitan's split). The last stage may hold the norm + head alone."""
    units, extra = divmod(n_blocks + 2, n_stages)
    ranges, start = [], 0
    for stage in range(n_stages):
        count = units + (stage < extra) - (stage == 0) - (stage == n_stages - 1)
        ranges.append(range(start, start + count))
        start += count
    return ranges


def stage_ranks(pp: int, n_stages: int, v_shape: bool) -> list[int]:
    """The pp rank of each stage: looped (stage i on rank i % pp) or V-shaped (two stages per rank, the
    first and the last on rank 0), as torchtitan's ``_get_pp_rank_to_stage_indices_mapping``."""
    if v_shape:
        return [i if i < pp else n_stages - 1 - i for i in range(n_stages)]
    return [i % pp for i in range(n_stages)]


class _Blocks(nn.ModuleDict):
    """Some blocks of a stack under their indices in it (so parameter names stay the plain model's);
    iterating yields the blocks, as the stack's ModuleList does."""

    def __iter__(self):
        return iter(self.values())


class _TiedTokens(nn.Module):
    """The token embeddings alone, where the last stage of a tied model keeps its copy (``embed.tokens``)."""

    def __init__(self, tokens: nn.Embedding) -> None:
        super().__init__()
        self.tokens = tokens


class StagePart(nn.Module):
    """Blocks ``blocks`` of a decoder, with the embeddings when ``first`` and the final norm + head when
    ``last`` (and, tied to the head, the token embeddings); the modules are the model's own (shared, not
    copied). The last part returns the head's input: the schedule's loss function applies the head."""

    def __init__(self, model: TransformerLM, blocks: Sequence[int], first: bool, last: bool) -> None:
        super().__init__()
        stack = copy.copy(model.stack)  # the stack's forward (masks, RoPE) over these blocks only
        stack._modules = {**model.stack._modules, "final_norm": model.stack.final_norm if last else None,
                          "layers": _Blocks({str(i): model.stack.layers[i] for i in blocks})}
        self.first = first
        self.embed = model.embed if first else None
        if last and not first and model.config.tie_embeddings:
            self.embed = _TiedTokens(model.embed.tokens)
        self.stack = stack
        self.head = model.head if last else None

    def output_weight(self) -> torch.Tensor:
        return self.head.weight if self.head.weight is not None else self.embed.tokens.weight

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.first:
            x = self.embed(x, position_ids)
        x = self.stack(x, position_ids=position_ids, key_padding=attention_mask, document_ids=document_ids)
        return self.head(x, self.output_weight(), return_hidden=True) if self.head is not None else x


class RankStages(StagePart):
    """This rank's stages (those ``ranks`` puts on this rank of ``group``) in one module: what the optimizer
    and the checkpoints see, under the plain model's names. Called like the plain model, it runs a forward-only
    pass through the whole pipeline (evaluation): the ranks of ``group`` call it together with the same
    batch and all get the last stage's logits, or what ``head_loss`` makes of its output."""

    def __init__(self, model: TransformerLM, blocks: list[range], ranks: list[int], group: dist.ProcessGroup) -> None:
        n, rank = len(blocks), dist.get_rank(group)
        mine = [i for i in range(n) if ranks[i] == rank]
        super().__init__(model, [b for i in mine for b in blocks[i]], 0 in mine, n - 1 in mine)
        self.parts = {i: StagePart(model, blocks[i], i == 0, i == n - 1) for i in mine}  # not submodules
        self.config, self.ranks, self.group = model.config, ranks, group

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                head_loss: HeadLoss | None = None) -> torch.Tensor:
        ranks, me, shape = self.ranks, dist.get_rank(self.group), (*input_ids.shape, self.config.d_model)
        inputs = {"position_ids": resolve_positions(input_ids, attention_mask, document_ids, position_ids),
                  "attention_mask": attention_mask, "document_ids": document_ids}
        x = input_ids
        for index, part in sorted(self.parts.items()):  # stage i waits for stage i-1 (here or on another rank)
            if index > 0 and ranks[index - 1] != me:
                x = torch.empty(shape, device=input_ids.device)
                dist.recv(x, group_src=ranks[index - 1], group=self.group)
            x = part(x, **inputs)
            if index < len(ranks) - 1 and ranks[index + 1] != me:
                dist.send(x.float().contiguous(), group_dst=ranks[index + 1], group=self.group)
        if self.head is None:
            out = torch.empty(() if head_loss else (*input_ids.shape, self.config.vocab_size), device=input_ids.device)
        elif head_loss is not None:
            out = head_loss(x, self.output_weight(), self.head.bias).float()
        else:
            out = F.linear(x, self.output_weight(), self.head.bias).float()
        dist.broadcast(out, group_src=ranks[-1], group=self.group)
        return out


class _RouterLossGradient(torch.autograd.Function):
    """The identity on a stage's output whose backward also gives the stage's router loss the gradient
    ``weight`` (Megatron's ``MoEAuxLossAutoScaler``): that loss reaches the stage's parameters through the
    stage's own backward, as if the pipeline's loss held it."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, router_loss: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        ctx.save_for_backward(router_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (router_loss,) = ctx.saved_tensors
        return grad, torch.full_like(router_loss, ctx.weight), None


class StageRouters:
    """The MoE router losses (load balancing, z-loss) of this rank's stages. What a stage's layers record
    in its forward of micro-batch b back-propagates with b's weight in the step (its loss units times the
    loop's scale, as the loop adds router losses), and becomes b's ``moe/*`` metrics, summed over the
    pipeline's stages. The schedule names the micro-batch in a keyword input the hooks take out."""

    def __init__(self, parts: dict[int, StagePart], n_experts: int, group: dist.ProcessGroup) -> None:
        self.n_experts, self.group = n_experts, group
        self.weights: list[float] = []
        self.stats: dict[tuple[int, int], RouterStats] = {}  # (stage, micro-batch) -> what its layers recorded
        self.micro_batch: int | None = None  # of the stage forward running now
        for stage, part in parts.items():
            layers = moe_layers(part)
            part.register_forward_pre_hook(functools.partial(self._before, layers), with_kwargs=True)
            part.register_forward_hook(functools.partial(self._after, stage, layers), with_kwargs=True)

    def _before(self, layers: list[MoE], part: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        pop_router_stats(layers)  # what backward's recomputation (activation checkpointing) recorded
        micro_batch = kwargs.pop("micro_batch", None)  # None: evaluation
        self.micro_batch = None if micro_batch is None else int(micro_batch[0])
        return args, kwargs

    def _after(self, stage: int, layers: list[MoE], part: nn.Module, args: tuple, kwargs: dict,
               output: torch.Tensor) -> torch.Tensor | None:
        stats = pop_router_stats(layers)
        if stats is None or self.micro_batch is None:
            return None
        self.stats[stage, self.micro_batch] = stats  # the shape inference's forward is overwritten
        return _RouterLossGradient.apply(output, stats.loss, self.weights[self.micro_batch])

    def start(self, labels: list[torch.Tensor], scale: float) -> torch.Tensor:
        """Before a step over micro-batches of ``labels``: their weights, and the ``micro_batch`` keyword
        input (each row's micro-batch)."""
        self.weights, self.stats = [scale * float((t != IGNORE_INDEX).sum()) for t in labels], {}
        return torch.cat([torch.full((len(t),), i, device=t.device) for i, t in enumerate(labels)])

    def metrics(self, units: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each micro-batch's ``moe/*`` metrics as the loop makes them (sums over its ``units``): the
        router loss summed over the pipeline's layers, the statistics their means."""
        rows = torch.zeros(len(units), 5 + self.n_experts, dtype=torch.float64, device=units[0].device)
        for (_, micro_batch), stats in self.stats.items():  # summed over layers: router loss; aux, z, dropped, load
            layers = stats.counts.shape[0]
            means = torch.stack([stats.aux_loss, stats.z_loss, stats.dropped]).to(rows)
            rows[micro_batch] += torch.cat([stats.loss.detach().to(rows)[None], means * layers,
                                            rows.new_tensor([layers]), stats.load.to(rows) * layers])
        dist.all_reduce(rows, group=self.group)
        out = []
        for row, count in zip(rows, units):
            share = count / row[4]  # the units over the layers
            out.append({"moe/router_loss": row[0] * count, "moe/aux_loss": row[1] * share,
                        "moe/z_loss": row[2] * share, "moe/dropped": row[3] * share,
                        **{f"moe/load/{e}": load * share for e, load in enumerate(row[5:])}})
        return out


class PipelineParallel(Single):
    mesh_dims = ("dp", "pp")

    def __init__(self, cfg, env, accumulation: int = 1, size: int = 2, schedule: str = "1F1B",
                 seq_len: int = 0) -> None:
        super().__init__(cfg, env, accumulation)
        self.size, self.seq_len = size, seq_len
        self.schedule_class = get_schedule_class(str(schedule))
        self.schedule_name = str(schedule)
        self.data_copies = size  # ranks p·pp … p·pp + pp-1 form one pipeline and read batch p
        self.loss_sums: list[torch.Tensor] = []
        self.scale = 1.0

    # -- building the stages ----------------------------------------------------------------------

    def _check(self, model: nn.Module) -> None:
        pp, cfg = self.size, model.config
        if self.env.world_size % pp:
            raise ConfigError(f"parallel.pp={pp} must divide the {self.env.world_size} ranks")
        ParallelConfig(pp=pp, pp_schedule=PipelineSchedule(self.schedule_name)).check_model(cfg)  # as at load
        if not isinstance(model, TransformerLM):
            raise ConfigError("parallel.pp cuts a decoder (model.arch=decoder, an LM head) into stages; "
                              "encoders, encoder-decoders and classifiers are not supported")
        if self.accumulation < pp:
            raise ConfigError(f"parallel.pp={pp} needs at least {pp} micro-batches per step to fill the pipeline, "
                              f"got {self.accumulation}: raise train.global_batch_size")

    def wrap(self, model: nn.Module) -> nn.Module:
        pp = self.size
        single = issubclass(self.schedule_class, PipelineScheduleSingle)
        n_stages = pp * (1 if single else 2)
        self._check(model)
        mesh = device_mesh(self.env.device.type, (self.env.world_size // pp, pp), self.mesh_dims)
        self.pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group("dp")
        self.ranks = stage_ranks(pp, n_stages, self.schedule_class in (ScheduleZBVZeroBubble, ScheduleDualPipeV))
        mine = [i for i, rank in enumerate(self.ranks) if rank == dist.get_rank(self.pp_group)]
        blocks = stage_blocks(model.config.n_layers, n_stages)
        kept = {id(model.stack.layers[b]) for i in mine for b in blocks[i]}

        def drop_others(block: nn.Module) -> None:  # a block of another rank's stage goes as soon as it is made
            if id(block) not in kept:
                block.to("meta")

        # initialised in the order and from the seed of every other strategy, one block at a time
        materialize(model, self.cfg.seed, drop_others)
        prepare(model, self.cfg.activation_checkpointing, self.cfg.compile)
        self.model = RankStages(model, blocks, self.ranks, self.pp_group)
        self.tied = self._tied_embeddings(model.config.tie_embeddings)
        for module, needed in ((model.embed, self.model.embed is not None), (model.head, self.model.head is not None)):
            if not needed:  # another rank's
                module.to("meta")
        self.model.to(self.env.device)
        self.liger = self.model.config.kernels == "liger"
        stages = [PipelineStage(part, i, n_stages, self.env.device, group=self.pp_group)
                  for i, part in self.model.parts.items()]
        try:
            self.schedule = self.schedule_class(stages[0] if single else stages, n_microbatches=self.accumulation,
                                                loss_fn=self._loss, scale_grads=False)
        except ValueError as e:  # the schedule's own limits (micro-batches against stages)
            raise ConfigError(f"parallel.pp_schedule={self.schedule_name}: {e}") from None
        self.routers = StageRouters(self.model.parts, model.config.n_experts, self.pp_group) \
            if model.config.n_experts else None
        self.optimizer = build_adamw(self.model, self.cfg, self.env.device)
        return self.model

    def _tied_embeddings(self, tied: bool) -> nn.Parameter | None:
        """With tied embeddings the first stage's token embeddings and the last's copy, on two pp ranks,
        sum their gradients in a group of their own (one per pipeline; Megatron's embedding group): both
        then take the same steps. This rank's copy, or None (also where one rank holds both stages)."""
        first, last = self.ranks[0], self.ranks[-1]
        if not tied or first == last:
            return None
        for start in range(0, self.env.world_size, self.size):
            group = dist.new_group([start + first, start + last])  # every rank creates every group
            if self.env.rank in (start + first, start + last):
                self.tied_group = group
        return self.model.embed.tokens.weight if self.model.embed is not None else None

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        raise ConfigError("parallel.pp trains one model: objectives with a frozen reference are not supported")

    # -- one step ---------------------------------------------------------------------------------

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss: the head over its output, summed, times the loop's scale."""
        weight, bias, chunk = self.model.output_weight(), self.model.head.bias, self.cfg.loss_chunk_size
        if chunk:
            loss_sum = head_cross_entropy(labels, chunk, self.liger)(hidden, weight, bias)
        else:
            loss_sum = cross_entropy_sum(F.linear(hidden, weight, bias).float(), labels)
        self.loss_sums.append(loss_sum.detach())
        return loss_sum * self.scale

    def _full_width(self, batch: Batch) -> Batch:
        """``batch`` right-padded to data.seq_len: the stages keep the shapes of their first step, and an
        SFT micro-batch is as wide as its longest conversation. The padding has no target and, behind
        every real token under the causal mask, changes no real token's output."""
        shape = batch["input_ids"].shape
        missing = self.seq_len - shape[1]
        if missing <= 0:
            return batch
        fill = {"labels": IGNORE_INDEX}  # input ids, attention mask (0: padding), positions, documents: 0
        return {key: F.pad(value, (0, missing), value=fill.get(key, 0)) if value.shape == shape else value
                for key, value in batch.items()}

    def forward_backward(self, micro_batches: list[Batch], scale: float, loss: Callable, objective) -> MetricSums:
        from trainer.objectives.clm import CausalLM

        if not isinstance(objective, CausalLM):
            raise ConfigError("parallel.pp trains the clm and sft objectives (a decoder's next-token loss) only; "
                              f"{type(objective).__name__} is not supported")
        inputs, labels, kwargs = [], [], []
        for batch in micro_batches:
            batch = self._full_width(to_device(batch, self.env.device))
            (input_ids,), extra = objective.model_inputs(batch)
            extra["position_ids"] = resolve_positions(input_ids, extra.get("attention_mask"),
                                                      extra.get("document_ids"), extra.get("position_ids"))
            inputs.append(input_ids)
            labels.append(batch["labels"])
            kwargs.append(extra)
        self.scale, self.loss_sums = scale, []
        inputs_by_key = {key: torch.cat([k[key] for k in kwargs]) for key in kwargs[0]}
        if self.routers is not None:
            inputs_by_key["micro_batch"] = self.routers.start(labels, scale)
        with self.autocast():
            self.schedule.step(torch.cat(inputs), target=torch.cat(labels), return_outputs=False, **inputs_by_key)
        # every rank of the pipeline reports the last stage's loss sums; the first
        # step's shape inference also ran the loss once: the micro-batches' come last
        n = len(micro_batches)
        sums = torch.stack(self.loss_sums[-n:]).double() if self.loss_sums else \
            torch.zeros(n, dtype=torch.float64, device=self.env.device)
        dist.broadcast(sums, group_src=self.ranks[-1], group=self.pp_group)
        counts = [(target != IGNORE_INDEX).sum() for target in labels]
        routers = self.routers.metrics(counts) if self.routers is not None else [{}] * n
        metrics = MetricSums()
        for loss_sum, count, router in zip(sums, counts, routers):
            metrics.add(LossOutput(loss_sum=loss_sum, count=count, metrics=router))
        return metrics

    def _trained(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _counted(self) -> list[nn.Parameter]:
        """The trained parameters that count in norms: all but the last stage's copy of tied embeddings."""
        copy = self.tied if self.tied is not None and self.model.head is not None else None
        return [p for p in self._trained() if p is not copy]

    def _norm(self, tensors: list[torch.Tensor]) -> float:
        squares = sum((t.double().pow(2).sum() for t in tensors), torch.zeros((), dtype=torch.float64))
        dist.all_reduce(squares, group=self.pp_group)
        return float(squares.sqrt())

    def step(self, lr: float, skip: bool = False) -> float:
        params = self._trained()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dp = dist.get_world_size(self.dp_group)
        if dp > 1:  # the replicas of each stage average their gradients, as DDP does
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat, group=self.dp_group)
            flat /= dp
            pieces = flat.split([p.numel() for p in params])
            torch._foreach_copy_([p.grad for p in params], [piece.view_as(p) for piece, p in zip(pieces, params)])
        if self.tied is not None:  # the embeddings' and the head's parts of the tied weight's gradient
            dist.all_reduce(self.tied.grad, group=self.tied_group)
        norm = self._norm([p.grad for p in self._counted()])
        return clip_and_step(self.optimizer, [p.grad for p in params], norm, self.cfg.grad_clip, lr, skip)

    @torch.no_grad()
    def weight_norm(self) -> float:
        return self._norm(self._counted())

    # -- checkpoints: the plain model's names; each rank writes and reads its stages' tensors -------

    def save(self, path: Path) -> None:
        """As every torch-native strategy (DCP), but each optimizer group lists the parameters of every
        stage: a loader takes a group's settings from the saved group naming its parameter, and DCP keeps
        one rank's copy of the groups."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=TRAINED)
        stages = [None] * self.size
        dist.all_gather_object(stages, [group["params"] for group in optim_state["param_groups"]], group=self.pp_group)
        for index, group in enumerate(optim_state["param_groups"]):
            group["params"] = list(dict.fromkeys(name for names in stages for name in names[index]))
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path / "dcp")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The stages' tensors of the first pipeline (dp rank 0), gathered on rank 0 (a tied copy is equal)."""
        if self.env.rank >= self.size:
            return None
        state = {name: t.detach().cpu().clone() for name, t in self.model.state_dict().items()}
        parts = [None] * self.size if self.env.is_main else None
        dist.gather_object(state, parts, group_dst=0, group=self.pp_group)
        return {k: v for part in parts for k, v in part.items()} if self.env.is_main else None
