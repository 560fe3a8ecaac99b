"""Fused-kernel checks that need CUDA (skipped without it): FlexAttention backward parity, bf16
tolerances against the fp32 eager reference, and SDPA dispatching plain causal attention to a
flash / cuDNN kernel (nothing materialised)."""

import pytest
import torch
from model_helpers import seeded, tiny

from trainer.objectives.cross_entropy import chunked_linear_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


def packed_batch(vocab=64, length=128):
    ids = torch.randint(1, vocab, (2, length), device=CUDA)
    docs = torch.zeros(2, length, dtype=torch.long, device=CUDA)
    docs[:, 40:] = 1
    docs[1, 90:] = 2
    return ids, docs


@pytest.mark.parametrize(("pos", "masking"), [("rope", "documents"), ("alibi", "documents"),
                                              ("t5_bias", "documents"), ("rope", "prefix")])
def test_flex_backward_matches_eager(pos, masking):
    ids, docs = packed_batch()
    kwargs = {"document_ids": docs} if masking == "documents" else {"prefix_lengths": torch.tensor([30, 70],
                                                                                                    device=CUDA)}
    grads, outs = {}, {}
    for attn in ("eager", "flex"):
        model = seeded(tiny(pos=pos, attn=attn, max_seq_len=256, sliding_window=64)).to(CUDA)
        logits = model(ids, **kwargs)
        logits.logsumexp(-1).mean().backward()
        outs[attn] = logits.detach()
        grads[attn] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(outs["flex"], outs["eager"], atol=1e-4, rtol=1e-4)
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["flex"][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "flex"])
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_bf16_stays_close_to_the_fp32_reference(attn, arch):
    ids, docs = packed_batch()
    reference = seeded(tiny(arch=arch, pos="rope", attn="eager", max_seq_len=256)).to(CUDA).eval()
    fused = seeded(tiny(arch=arch, pos="rope", attn=attn, max_seq_len=256)).to(CUDA, torch.bfloat16).eval()
    with torch.no_grad():
        expected = reference(ids, document_ids=docs)
        got = fused(ids, document_ids=docs)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 2e-2 * scale


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_sdpa_runs_plain_causal_attention_on_flash_or_cudnn(n_kv_heads):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = seeded(tiny(d_model=256, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=512)).to(CUDA, torch.bfloat16)
    ids = torch.randint(1, 64, (2, 512), device=CUDA)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        loss = model(ids).logsumexp(-1).mean()  # raises if neither fused kernel accepts the call
        loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize(("mlp", "gelu_tanh", "bias"), [("swiglu", False, False), ("geglu", True, True)])
def test_liger_kernels_match_the_pytorch_path(mlp, gelu_tanh, bias):
    pytest.importorskip("liger_kernel")
    ids, _ = packed_batch()
    results = {}
    for choice in ("torch", "liger"):
        model = seeded(tiny(kernels=choice, mlp=mlp, gelu_tanh=gelu_tanh, bias=bias, max_seq_len=256)).to(CUDA)
        hidden = model(ids, return_hidden=True)
        loss = chunked_linear_cross_entropy(hidden, model.output_weight(), ids.roll(-1, 1), model.output_bias(),
                                            chunk_size=64, liger=choice == "liger")
        loss.backward()
        results[choice] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(results["liger"][0], results["torch"][0], rtol=1e-4, atol=1e-4)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["liger"][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_liger_bf16_training_step_stays_close_to_pytorch():
    pytest.importorskip("liger_kernel")
    ids = torch.randint(1, 64, (4, 256), device=CUDA)
    losses = {}
    for choice in ("torch", "liger"):
        model = seeded(tiny(kernels=choice, d_model=128, n_heads=4, max_seq_len=256)).to(CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(ids, return_hidden=True)
            losses[choice] = chunked_linear_cross_entropy(hidden, model.output_weight(), ids.roll(-1, 1),
                                                          liger=choice == "liger") / ids.numel()
        losses[choice].backward()
    assert abs(losses["liger"].item() - losses["torch"].item()) <= 1e-2 * losses["torch"].item()


@pytest.mark.parametrize("pos", ["rope", "t5_bias"])
def test_auto_attention_runs_flex_for_documents_and_matches_eager(pos):
    from model.attention import AttentionMask

    ids, docs = packed_batch()
    built = []
    original = AttentionMask._block_mask
    AttentionMask._block_mask = lambda self, *a: built.append(1) or original(self, *a)
    try:
        grads, outs = {}, {}
        for attn in ("eager", "auto"):
            model = seeded(tiny(pos=pos, attn=attn, max_seq_len=256)).to(CUDA)
            logits = model(ids, document_ids=docs)
            logits.logsumexp(-1).mean().backward()
            outs[attn], grads[attn] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    finally:
        AttentionMask._block_mask = original
    assert built, "auto did not build a FlexAttention block mask"
    torch.testing.assert_close(outs["auto"], outs["eager"], atol=1e-4, rtol=1e-4)
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["auto"][name], grad, atol=1e-4, rtol=1e-3, msg=name)
