"""Evaluation, in one place: the loop over validation batches that the trainer runs every
``train.eval_every`` steps and ``tessera eval`` runs on a checkpoint, the metrics beyond an
objective's own loss (exact match, teacher-forced accuracy, the preference log-prob accuracy), and
which objective scores a shard directory (chosen from :data:`trainer.objectives.OBJECTIVES` and
:data:`data.loader.DATA_OBJECTIVES`, built without a Strategy).

Every number is a sum over units (tokens, samples, pairs) on every rank, divided once at the end:
batch sizes and ranks do not weigh in.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed

from common.errors import UserError
from data.collate import IGNORE_INDEX
from data.loader import DATA_OBJECTIVES
from trainer.distributed import all_reduce, to_device
from trainer.metrics import MetricSums
from trainer.objectives import OBJECTIVES, PRETRAIN_OBJECTIVE, Batch, Objective, ObjectiveName


def perplexity(loss: float) -> float:
    """exp of a mean token cross-entropy, capped so that a diverged model reads as huge, not inf."""
    return math.exp(min(loss, 50.0))


def token_level(objective: Objective) -> bool:
    """Its loss is a mean token cross-entropy (so exp(loss) is a perplexity)."""
    return DATA_OBJECTIVES[objective.data_objective].token_level


class Scorer(Protocol):
    """A metric beyond the objective's loss: sums per batch, then :meth:`finish` over the totals."""

    def sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, float]: ...

    def finish(self, totals: dict[str, float]) -> dict[str, Any]: ...


@dataclasses.dataclass
class Scores:
    """``means``: the objective's loss and metrics per unit; ``units``: how many (tokens, samples,
    pairs) over every rank; ``extra``: what the scorers report."""

    means: dict[str, float]
    units: int
    extra: dict[str, Any]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    objective: Objective | None,
    batches: Iterable[Batch],
    *,
    device: torch.device | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_batches: int | None = None,
    scorers: Sequence[Scorer] = (),
) -> Scores:
    """The loss (and metrics) of ``objective`` and the ``scorers``' metrics over ``batches`` (the
    first ``max_batches``), summed on every rank and divided once. All ranks call it together.
    Batches move to ``device`` (when given) after an online objective's rollout."""
    sums = MetricSums()
    count = torch.zeros((), dtype=torch.float64, device=device)
    extra: dict[str, float] = {}
    rollout = getattr(objective, "rollout", None)
    for i, batch in enumerate(batches):
        if i == max_batches:
            break
        if rollout is not None:  # online alignment: score completions sampled now
            [batch], _ = rollout(model, lambda batch=batch: [batch], train=False)
        if device is not None:
            batch = to_device(batch, device)
        if objective is not None:
            with autocast():
                out = objective.loss(model, batch)
            sums.add(out)
            count += out.count.double()
        for scorer in scorers:
            for name, value in scorer.sums(model, batch).items():
                extra[name] = extra.get(name, 0.0) + float(value)
    means, units = {}, 0
    if objective is not None:
        count = all_reduce(count)
        means, units = sums.reduce(count), int(count.item())
    if scorers:
        names = sorted(extra)  # the same names in the same order on every rank
        sums_of = all_reduce(torch.tensor([extra[n] for n in names], dtype=torch.float64, device=count.device))
        totals = collections.defaultdict(float, zip(names, sums_of.tolist()))  # no batch: every sum is 0
        extra = {k: v for scorer in scorers for k, v in scorer.finish(totals).items()}
    return Scores(means, units, extra)


# -- metrics beyond the objective's loss ----------------------------------------------------------


class LabelCounts:
    """The majority-class accuracy, the trivial baseline a classifier must beat."""

    def __init__(self, n_labels: int) -> None:
        self.n_labels = n_labels

    def sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, float]:
        counts = torch.bincount(batch["labels"], minlength=self.n_labels).tolist()
        return {f"label/{k}": n for k, n in enumerate(counts)}

    def finish(self, totals: dict[str, float]) -> dict[str, Any]:
        counts = [totals[f"label/{k}"] for k in range(self.n_labels)]
        return {"majority_accuracy": max(counts) / max(sum(counts), 1)}


class ExactMatch:
    """Rows whose greedy decoding equals the target up to and including its EOS. Decoding stops after
    as many tokens as the longest target: anything longer is wrong anyway."""

    def __init__(self, tokenizer: Any) -> None:
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id

    def sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, float]:
        from model.generate import generate

        targets = [row[row != IGNORE_INDEX].tolist() for row in batch["labels"]]
        out = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"].bool(),
                       max_new_tokens=max(map(len, targets)), eos_token_ids=[self.eos_id], pad_token_id=self.pad_id)
        hits = sum(out[b, 1 : 1 + len(t)].tolist() == t for b, t in enumerate(targets))
        return {"exact_hits": hits, "rows": len(targets)}

    def finish(self, totals: dict[str, float]) -> dict[str, Any]:
        return {"exact_match": totals["exact_hits"] / max(totals["rows"], 1), "samples": int(totals["rows"])}


class TeacherForcedAccuracy:
    """Target tokens that are the decoder's argmax given the true previous tokens."""

    def sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, float]:
        logits = model(batch["input_ids"], batch["decoder_input_ids"], attention_mask=batch["attention_mask"],
                       decoder_attention_mask=batch["decoder_attention_mask"])
        labels = batch["labels"]
        return {"token_hits": int(((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()),
                "target_tokens": int((labels != IGNORE_INDEX).sum())}

    def finish(self, totals: dict[str, float]) -> dict[str, Any]:
        return {"token_accuracy": totals["token_hits"] / max(totals["target_tokens"], 1)}


class PairLogProbs:
    """Share of pairs whose chosen continuation has the higher summed log-prob, and the mean margin
    (DPO's implicit-reward accuracy would need the reference model too)."""

    def sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, float]:
        from trainer.objectives.pairs import pair_logps

        logps = pair_logps(model, batch)
        diff = logps.chosen - logps.rejected
        return {"wins": float((diff > 0).sum()), "margin": float(diff.sum()), "pairs": len(diff)}

    def finish(self, totals: dict[str, float]) -> dict[str, Any]:
        if not totals["pairs"]:
            raise UserError("the shards gave no pair to evaluate")
        return {"logp_accuracy": totals["wins"] / totals["pairs"], "logp_margin": totals["margin"] / totals["pairs"],
                "pairs": int(totals["pairs"])}


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """How ``tessera eval`` scores shards for one objective: its loss (unless it needs more than a
    checkpoint holds, as DPO's reference) and which scorers besides."""

    scorers: Callable[[torch.nn.Module, Any], list[Scorer]] = lambda model, tokenizer: []
    loss: bool = True


EVALS: dict[ObjectiveName, EvalSpec] = {
    ObjectiveName.classify: EvalSpec(lambda model, tokenizer: [LabelCounts(model.config.n_labels)]),
    ObjectiveName.seq2seq: EvalSpec(lambda model, tokenizer: [ExactMatch(tokenizer), TeacherForcedAccuracy()]),
    ObjectiveName.preference: EvalSpec(lambda model, tokenizer: [PairLogProbs()], loss=False),
}


# -- which objective scores a shard directory -----------------------------------------------------

def model_kind(model: torch.nn.Module) -> tuple[str, bool]:
    """What ``model`` is, in words for an error, and whether it is a decoder LM (causal, no encoder)."""
    from model.transformer import Seq2SeqLM, SequenceClassifier

    classifier = isinstance(model, SequenceClassifier)
    what = "a classifier" if classifier else f"an LM of arch {model.config.arch}"
    return what, not classifier and not isinstance(model, Seq2SeqLM) and model.config.causal


def shard_objective(kind: str, model: torch.nn.Module, labels: list[str] | None, where: Any) -> ObjectiveName:
    """The objective that scores ``model`` on shards of ``kind``; a mismatch is a one-line error.
    Text shards get what the model's architecture pretrains on; other kinds the objective whose
    data objective reads them and whose head the model has."""
    from model.transformer import Seq2SeqLM, SequenceClassifier

    seq2seq, classifier = isinstance(model, Seq2SeqLM), isinstance(model, SequenceClassifier)
    what, decoder = model_kind(model)
    need = {"text": (not classifier, "a language model"),
            "classification": (classifier, "a classifier (train.objective=classify)"),
            "seq2seq": (seq2seq, "an encoder_decoder model"),
            "preference": (decoder, "a decoder LM"), "sft": (decoder, "a decoder LM")}
    if kind not in need:
        raise UserError(f"tessera eval does not score {kind} shards; it scores {', '.join(need)} shards")
    ok, wanted = need[kind]
    if not ok:
        raise UserError(f"{kind} shards need {wanted}; {where} holds {what}")
    if classifier and len(labels or []) != model.config.n_labels:
        raise UserError(f"{where} scores {model.config.n_labels} labels; the shards name {len(labels or [])}: {labels}")
    if kind == "text":
        return PRETRAIN_OBJECTIVE[str(model.config.arch)]
    head = "classifier" if classifier else "lm"
    return next(name for name, spec in OBJECTIVES.items() if spec.head == head and name in DATA_OBJECTIVES
                and DATA_OBJECTIVES[name].shard_kind == kind)


def eval_objective(name: ObjectiveName, model: torch.nn.Module, tokenizer: Any) -> Objective:
    """Objective ``name`` built from its own row of OBJECTIVES for a plain model (no Strategy, full logits)."""
    from trainer.config import RunConfig
    from trainer.objectives import ObjectiveContext, build_objective

    cfg = RunConfig.from_dict({"train": {"loss_chunk_size": 0}})
    return build_objective(name, ObjectiveContext(str(name), cfg, tokenizer, None, model))


def score(model: torch.nn.Module, name: ObjectiveName, batches: Iterable[Batch], tokenizer: Any, *,
          max_batches: int | None = None) -> dict[str, Any]:
    """What ``tessera eval`` reports for objective ``name`` over ``batches``: the mean loss and the
    objective's metrics, perplexity and the token count for token-level objectives (else the sample
    count), and the scorers' metrics."""
    spec = EVALS.get(name, EvalSpec())
    objective = eval_objective(name, model, tokenizer) if spec.loss else None
    result = evaluate(model, objective, batches, max_batches=max_batches, scorers=spec.scorers(model, tokenizer))
    if objective is None:
        return result.extra
    if not result.units:
        raise UserError("the shards gave no batch to evaluate")
    out: dict[str, Any] = dict(result.means)
    if token_level(objective):
        out |= {"ppl": perplexity(out["loss"]), "tokens": result.units}
    else:
        out["samples"] = result.units
    return out | result.extra


# -- multiple-choice tasks: log-likelihood of each choice given the context -----------------------


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids split as lm-evaluation-harness splits them: trailing spaces of the
    context move to the continuation, the whole string is encoded once and the continuation is what
    follows the context's own encoding (so a merge across the boundary is not scored twice). No BOS,
    as text shards have none; an empty context conditions on BOS alone."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation)
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return head, whole[len(head):]


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *,
                          pad_id: int, batch_size: int = 16, device: torch.device | None = None,
                          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                          forwards: int = 0) -> list[float]:
    """Summed log-prob of each continuation given its context, the pair cut from the left to the
    model's max_seq_len + 1 tokens (as lm-evaluation-harness cuts to its max_length). ``forwards``:
    run at least that many forward passes (sharded models gather weights in each, so every rank
    must run as many), the extra ones on one pad token, discarded."""
    from trainer.distributed import unwrap

    limit = unwrap(model).config.max_seq_len + 1
    rows = [(context + continuation)[-limit:] for context, continuation in pairs]
    out = []
    starts = range(0, len(rows), batch_size)
    for start in starts:
        chunk, sizes = rows[start : start + batch_size], [len(c) for _, c in pairs[start : start + batch_size]]
        width = max(map(len, chunk)) - 1
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # right padding: causal rows ignore it
        for i, row in enumerate(chunk):
            ids[i, : len(row) - 1] = torch.tensor(row[:-1])
        with autocast():
            logits = model(ids.to(device) if device is not None else ids)
        logprobs = logits.float().log_softmax(-1).cpu()
        for i, (row, size) in enumerate(zip(chunk, sizes)):
            n = len(row)
            targets = torch.tensor(row[n - size :])
            out.append(float(logprobs[i, n - size - 1 : n - 1].gather(1, targets[:, None]).sum()))
    for _ in range(forwards - len(starts)):
        with autocast():
            model(torch.full((1, 1), pad_id, dtype=torch.long, device=device))
    return out


def score_choices(model: torch.nn.Module, tokenizer: Any, items: Sequence[Any], *, delimiter: str = " ",
                  batch_size: int = 16, where: Any = "the checkpoint", rank: int = 0, world_size: int = 1,
                  device: torch.device | None = None,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  ) -> dict[str, Any]:
    """lm-evaluation-harness's multiple-choice metrics over ``items`` (data.tasks.MultipleChoice):
    ``acc`` (the choice of highest summed log-likelihood is the labelled one) and ``acc_norm`` (the
    same with each log-likelihood divided by its choice's length in characters), each continuation
    being ``delimiter + choice``, each with its standard error; ``chance`` is the mean of 1 / choices.
    In a run, data rank ``rank`` of ``world_size`` scores every world_size-th item and the counts are
    summed over all ranks (all call it together; ranks sharing a batch under tensor parallelism count
    alike, so the ratios hold)."""
    from trainer.distributed import unwrap

    what, decoder = model_kind(unwrap(model))
    if not decoder:
        raise UserError(f"multiple-choice tasks need a decoder LM; {where} holds {what}")
    mine = items[rank::world_size]
    pairs = [encode_pair(tokenizer, item.context, delimiter + choice) for item in mine for choice in item.choices]
    forwards = torch.tensor([-(-len(pairs) // batch_size)], device=device)
    forwards = int(all_reduce(forwards, op=torch.distributed.ReduceOp.MAX).item())
    logprobs = iter(continuation_logprobs(model, pairs, pad_id=tokenizer.pad_id, batch_size=batch_size,
                                          device=device, autocast=autocast, forwards=forwards))
    right = right_norm = chance = 0.0
    for item in mine:
        lls = [next(logprobs) for _ in item.choices]
        norm = [ll / len(choice) for ll, choice in zip(lls, item.choices)]
        right += lls.index(max(lls)) == item.label  # the first of equal maxima, as numpy's argmax
        right_norm += norm.index(max(norm)) == item.label
        chance += 1 / len(item.choices)
    totals = torch.tensor([right, right_norm, chance, len(mine)], dtype=torch.float64, device=device)
    right, right_norm, chance, n = all_reduce(totals).tolist()
    acc, acc_norm = right / n, right_norm / n
    return {"acc": acc, "acc_stderr": mean_stderr(acc, n), "acc_norm": acc_norm,
            "acc_norm_stderr": mean_stderr(acc_norm, n), "samples": int(n), "chance": chance / n}


def mean_stderr(share: float, n: float) -> float:
    """Standard error of a mean of n 0/1 scores, with the sample (n - 1) variance, as lm-eval reports it."""
    return math.sqrt(share * (1 - share) / (n - 1)) if n > 1 else float("nan")


# -- lm-evaluation-harness on an exported model -----------------------------------------------------


def harness(hf_dir: Any, tasks: Sequence[str], *, include_path: Any = None, batch_size: int = 16,
            device: str | None = None) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness's ``HFLM`` on a Hugging Face directory (``tessera export``'s output), on
    ``tasks`` (its own, or task YAMLs under ``include_path``): each task's metrics by name
    (``acc``, ``acc_stderr``, ``acc_norm``, ...; a filter other than ``none`` is kept as ``name,filter``).
    No BOS is prepended (``add_bos_token=False``): Tessera's text shards have none, and so
    ``--tasks`` scoring and this agree."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install lm_eval") from None
    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # indexing lm-eval's own takes a minute
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or under {include_path}" if include_path else " (add --include-path DIR for your own YAMLs)"
        raise UserError(f"lm-eval has no task {unknown[0]!r} among its own{where}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = HFLM(pretrained=str(hf_dir), device=device, batch_size=batch_size, add_bos_token=False)
    results = simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, log_samples=False)["results"]
    return {task: {name.removesuffix(",none"): value for name, value in metrics.items()
                   if "," in name and isinstance(value, (int, float))} for task, metrics in results.items()}
