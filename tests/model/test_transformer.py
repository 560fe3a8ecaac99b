import itertools

import pytest
import torch
from model_helpers import seeded, tiny

from common.errors import ConfigError, UserError
from model import build_model

ARCHS = ("decoder", "encoder", "encoder_decoder")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "t5_bias", "none")


def allowed(arch, pos):
    try:
        tiny(arch=arch, pos=pos)
        return True
    except ConfigError:
        return False


COMBOS = [c for c in itertools.product(ARCHS, POSITIONS) if allowed(*c)]


def run(model, ids, mask, dec_ids=None):
    if model.config.arch == "encoder_decoder":
        return model(ids, dec_ids, attention_mask=mask)
    return model(ids, attention_mask=mask)


def test_refused_combinations_are_the_documented_ones():
    refused = {c for c in itertools.product(ARCHS, POSITIONS) if not allowed(*c)}
    assert refused == {("encoder", "none"), ("encoder_decoder", "none"), ("encoder_decoder", "alibi")}


@pytest.mark.parametrize(("arch", "pos"), COMBOS)
def test_every_combination_trains_and_backends_agree(arch, pos):
    torch.manual_seed(0)
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False  # right padding in row 1
    dec_ids = torch.randint(1, 64, (2, 6))
    real = mask if arch != "encoder_decoder" else torch.ones(2, 6, dtype=torch.bool)
    outputs, grads = {}, {}
    for attn in ("eager", "sdpa"):
        model = seeded(tiny(arch=arch, pos=pos, attn=attn))
        logits = run(model, ids, mask, dec_ids)
        logits[real].logsumexp(-1).sum().backward()
        outputs[attn] = logits.detach()
        grads[attn] = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads[attn].values())
    model = seeded(tiny(arch=arch, pos=pos, attn="flex"))
    with torch.no_grad():
        outputs["flex"] = run(model, ids, mask, dec_ids)
    for attn in ("sdpa", "flex"):
        torch.testing.assert_close(outputs[attn][real], outputs["eager"][real], atol=1e-5, rtol=0)
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["sdpa"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize(("arch", "pos"), [("decoder", "rope"), ("decoder", "learned"), ("decoder", "alibi"),
                                           ("encoder", "t5_bias"), ("encoder", "sinusoidal")])
@torch.no_grad()
def test_document_masking_equals_each_document_alone(arch, pos, attn):
    model = seeded(tiny(arch=arch, pos=pos, attn=attn)).eval()
    lengths = (4, 7, 3)
    docs = [torch.randint(1, 64, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    together = model(packed, document_ids=doc_ids)
    alone = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex"])
@torch.no_grad()
def test_left_padding_equals_no_padding(attn):
    model = seeded(tiny(pos="rope", attn=attn)).eval()
    ids = torch.randint(1, 64, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], model(ids), atol=1e-5, rtol=0)


@torch.no_grad()
def test_sliding_window_limits_what_a_token_sees_and_backends_agree():
    ids = torch.randint(1, 64, (1, 12))
    changed = ids.clone()
    changed[0, :4] = (changed[0, :4] + 1) % 64
    out = {}
    for attn in ("eager", "sdpa", "flex"):
        model = seeded(tiny(n_layers=1, pos="alibi", attn=attn, sliding_window=3)).eval()
        out[attn] = model(ids)
        # with one layer, position 8 sees positions 6..8 only: the first four tokens cannot matter
        torch.testing.assert_close(model(changed)[:, 6:], out[attn][:, 6:], atol=1e-6, rtol=0)
        assert not torch.allclose(model(changed)[:, 4], out[attn][:, 4])
    torch.testing.assert_close(out["sdpa"], out["eager"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["flex"], out["eager"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_return_hidden_or_head_loss_times_output_weight_is_the_logits(arch):
    model = seeded(tiny(arch=arch, pos="t5_bias", tie_embeddings=arch != "decoder",
                             scale_output=arch == "encoder_decoder")).eval()
    ids = torch.randint(1, 64, (2, 5))
    args = (ids, ids[:, :3]) if arch == "encoder_decoder" else (ids,)
    hidden = model(*args, return_hidden=True)
    assert hidden.shape[-1] == 32
    logits = torch.nn.functional.linear(hidden, model.output_weight(), model.output_bias())
    torch.testing.assert_close(logits, model(*args), atol=1e-5, rtol=0)
    # head_loss sees the same input, weight and bias, inside forward
    via_head_loss = model(*args, head_loss=lambda h, w, b: torch.nn.functional.linear(h, w, b))
    torch.testing.assert_close(via_head_loss, model(*args), atol=1e-5, rtol=0)


@torch.no_grad()
def test_classifier_pools_the_last_real_token_of_a_decoder_and_the_first_of_an_encoder():
    ids = torch.randint(1, 64, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 2])
    decoder = seeded(tiny(n_labels=3), head="classifier").eval()
    scores = decoder(ids)
    assert scores.shape == (1, 3)
    torch.testing.assert_close(decoder(padded, attention_mask=mask), scores, atol=1e-5, rtol=0)
    encoder = seeded(tiny(arch="encoder", pos="learned"), head="classifier").eval()
    torch.testing.assert_close(encoder(padded, attention_mask=mask), encoder(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,pos", [("decoder", "rope"), ("encoder", "learned"), ("encoder_decoder", "t5_bias")])
def test_init_leaves_no_tensor_uninitialised(arch, pos):
    with torch.device("meta"):
        model = build_model(tiny(arch=arch, pos=pos, bias=True))
    assert all(p.is_meta for p in model.parameters())  # shapes only: nothing allocated
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan"))
    model.init_weights()
    assert all(torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("arch", ARCHS)
def test_materialize_block_by_block_gives_build_models_weights(arch):
    """What sharding strategies rely on: the numbers of ``torch.manual_seed(s); build_model(cfg)``,
    with at most one whole block alive besides the embeddings and head."""
    seq2seq = arch == "encoder_decoder"
    cfg = tiny(arch=arch, **({"pos": "t5_bias", "n_decoder_layers": 3} if seq2seq else {"pos": "rope"}))
    torch.manual_seed(3)
    expected = build_model(cfg).state_dict()
    with torch.device("meta"):
        lazy = build_model(cfg)
    names = {id(m): name for name, m in lazy.named_modules()}
    got, alive = {}, []

    def on_block(block: torch.nn.Module) -> None:
        alive.append(sum(p.numel() for p in lazy.parameters() if not p.is_meta))
        got.update({f"{names[id(block)]}.{k}": v.clone() for k, v in block.state_dict().items()})
        block.to("meta")  # as a strategy's sharding frees the whole block

    lazy.materialize("cpu", seed=3, on_block=on_block)
    got.update({k: v for k, v in lazy.state_dict().items() if not v.is_meta})
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    block = sum(p.numel() for p in lazy.blocks()[-1].parameters())
    rest = sum(p.numel() for p in lazy.parameters() if not p.is_meta)
    assert len(alive) == len(lazy.blocks()) and max(alive) <= rest + block


def test_blocks_init_and_heads():
    seq2seq = build_model(tiny(arch="encoder_decoder", pos="t5_bias", n_decoder_layers=3))
    assert len(seq2seq.blocks()) == 5
    torch.manual_seed(5)
    a = build_model(tiny())
    torch.manual_seed(5)
    b = build_model(tiny())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    a.init_weights(seed=1)
    assert not torch.equal(a.stack.layers[0].attn.qkv.weight, b.stack.layers[0].attn.qkv.weight)
    b.init_weights(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    std = a.stack.layers[0].mlp.down.weight.std().item()
    assert 0.5 * 0.02 / 2 < std < 1.5 * 0.02 / 2  # residual projections: init_std / sqrt(2 * 2 blocks)
    with pytest.raises(UserError, match="unknown model head 'reward'"):
        build_model(tiny(), head="reward")
    with pytest.raises(UserError, match="classifier head needs arch=decoder or arch=encoder"):
        build_model(tiny(arch="encoder_decoder", pos="t5_bias"), head="classifier")


def test_flex_refuses_backward_on_cpu_with_one_line():
    model = build_model(tiny(attn="flex"))
    with pytest.raises(UserError, match="attn=flex has no backward on CPU"):
        model(torch.randint(1, 64, (1, 4)))


@torch.no_grad()
def test_multi_query_attention_agrees_across_backends():
    ids = torch.randint(1, 64, (2, 9))
    outs = [seeded(tiny(n_kv_heads=1, attn=a)).eval()(ids) for a in ("eager", "sdpa", "flex")]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("pos", "refused"), [("rope", True), ("learned", True), ("alibi", False)])
def test_sequences_beyond_max_seq_len(pos, refused):
    model = seeded(tiny(pos=pos, max_seq_len=8))
    ids = torch.randint(1, 64, (1, 9))
    if refused:
        with pytest.raises(UserError, match=r"a sequence of 9 tokens is longer than model\.max_seq_len=8"):
            model(ids)
    else:  # relative score biases have no table to run out of
        assert model(ids).shape == (1, 9, 64)


@torch.no_grad()
def test_prefix_lm_sees_its_prefix_both_ways_and_backends_agree():
    ids = torch.randint(1, 64, (2, 10))
    prefix = torch.tensor([4, 6])
    later_prefix, after_prefix = ids.clone(), ids.clone()
    later_prefix[:, 3] = (later_prefix[:, 3] + 1) % 64  # inside both rows' prefix
    after_prefix[:, 8] = (after_prefix[:, 8] + 1) % 64  # after both prefixes
    out = {}
    for attn in ("eager", "sdpa", "flex"):
        model = seeded(tiny(pos="rope", attn=attn)).eval()
        out[attn] = model(ids, prefix_lengths=prefix)
        assert not torch.allclose(model(later_prefix, prefix_lengths=prefix)[:, 1], out[attn][:, 1])
        torch.testing.assert_close(model(after_prefix, prefix_lengths=prefix)[:, :8], out[attn][:, :8],
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids, prefix_lengths=torch.zeros(2, dtype=torch.long)), model(ids),
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(out["sdpa"], out["eager"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["flex"], out["eager"], atol=1e-5, rtol=0)


def test_auto_attention_takes_flex_only_where_sdpa_would_lose_its_fused_kernels():
    from model.attention import AttentionMask
    from model.position import Alibi

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    docs = torch.zeros(2, 8, dtype=torch.long)
    assert AttentionMask(causal=True, document_ids=docs).wants_flex(cuda, 8, 8, dropout_p=0.0)
    assert AttentionMask(causal=True, sliding_window=4).wants_flex(cuda, 8, 8, dropout_p=0.0)
    assert AttentionMask(bias=Alibi(tiny(pos="alibi"))).wants_flex(cuda, 8, 8, dropout_p=0.0)
    assert not AttentionMask(causal=True, document_ids=docs).wants_flex(cpu, 8, 8, dropout_p=0.0)  # no CPU backward
    assert not AttentionMask(causal=True, document_ids=docs).wants_flex(cuda, 8, 8, dropout_p=0.1)  # no dropout
    assert not AttentionMask(causal=True, sliding_window=4, q_offset=7).wants_flex(cuda, 1, 8, dropout_p=0.0)  # cache
    assert not AttentionMask(causal=True).wants_flex(cuda, 8, 8, dropout_p=0.0)  # flash / cuDNN take it
    assert not AttentionMask(key_padding=torch.ones(2, 8, dtype=torch.bool)).wants_flex(cuda, 8, 8, dropout_p=0.0)


def test_auto_attention_is_sdpa_on_cpu():
    ids = torch.randint(1, 64, (2, 16))
    docs = torch.zeros(2, 16, dtype=torch.long)
    docs[:, 9:] = 1
    logits = {attn: seeded(tiny(attn=attn, pos="alibi"))(ids, document_ids=docs) for attn in ("auto", "sdpa")}
    torch.testing.assert_close(logits["auto"], logits["sdpa"], rtol=0, atol=0)


def test_a_padding_mask_without_padding_is_dropped_so_sdpa_keeps_its_unmasked_kernels():
    from model.attention import Attention

    model = seeded(tiny(arch="encoder", pos="learned"))
    seen = []
    for module in model.modules():
        if isinstance(module, Attention):
            backend = module.backend
            module.backend = lambda q, k, v, mask, *rest, backend=backend: seen.append(mask.key_padding) or backend(
                q, k, v, mask, *rest)
    ids = torch.randint(1, 64, (2, 8))
    full = torch.ones(2, 8, dtype=torch.bool)
    padded = full.clone()
    padded[1, 6:] = False
    assert torch.equal(model(ids, attention_mask=full), model(ids))
    model(ids, attention_mask=padded)
    assert [p is None for p in seen] == [True] * 4 + [False] * 2


def test_a_tied_output_scaled_head_starts_with_t5_sized_logits():
    """Original T5 scales the tied head's input by d_model**-0.5 and so draws its embeddings from N(0, 1)
    (as transformers does): at init_std 0.02 the untrained logits had std 0.02 and learning crawled
    (bench/RESULTS.md, span corruption vs T5)."""
    torch.manual_seed(0)
    t5 = build_model(tiny(arch="encoder_decoder", pos="t5_bias", tie_embeddings=True, scale_output=True)).eval()
    assert 0.9 < t5.embeddings().weight.std().item() < 1.1
    ids = torch.randint(0, t5.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert 0.5 < t5(ids, ids).std().item() < 2.0
    llama = build_model(tiny(tie_embeddings=True))  # no output scaling: embeddings at init_std
    assert 0.015 < llama.embeddings().weight.std().item() < 0.025
    assert 0.015 < t5.encoder.layers[0].attn.qkv.weight.std().item() < 0.025  # the rest as before


@pytest.mark.parametrize("tied", [True, False])
def test_t5_init_scheme_draws_every_tensor_as_transformers_t5(tied):
    """init_scheme=t5 (the T5 presets'): every tensor has the spread transformers gives the same
    T5ForConditionalGeneration. The GPT-style init (init_std 0.02, residual projections / sqrt(2·blocks))
    left the decoder's residual stream equal to its N(0, 1) input embedding: untrained, the model
    predicted its own input token (span loss 11.5 against T5's 8.7) and trailed T5 (bench/RESULTS.md)."""
    import transformers

    from model import ModelConfig
    from model.hf import config_to_hf, state_to_hf

    cfg = ModelConfig.from_dict({"preset": "tiny-t5", "vocab_size": 2048, "d_model": 128, "n_heads": 4,
                                 "d_ff": 352, "tie_embeddings": tied, "scale_output": tied})
    assert cfg.init_scheme == "t5"
    torch.manual_seed(0)
    ours = state_to_hf(build_model(cfg).state_dict(), cfg)
    reference = transformers.T5ForConditionalGeneration(transformers.T5Config(**config_to_hf(cfg))).state_dict()
    assert set(ours) <= set(reference) and {k for k in reference if k not in ours} <= {
        "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}  # transformers' aliases of shared.weight
    for name, tensor in ours.items():
        expected = reference[name]
        assert tensor.shape == expected.shape, name
        if name.endswith("layer_norm.weight"):
            assert torch.equal(tensor, expected), name
            continue
        if name == "lm_head.weight" and not tied:  # fan-in, as mesh-tensorflow's dense layer: unit logits
            assert abs(tensor.std().item() * 128**0.5 - 1) < 0.05  # (transformers: N(0, 1), logits' std √d)
            continue
        spread = tensor.std().item() / expected.std().item()
        assert abs(spread - 1) < (0.25 if tensor.numel() < 1000 else 0.05), (name, spread)
    torch.manual_seed(0)
    assert build_model(tiny()).stack.layers[0].mlp.down.weight.std() < 0.015  # init_scheme=normal as before
