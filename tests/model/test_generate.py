import pytest
import torch
from model_helpers import hf_model, tiny

from common.errors import UserError
from model import build_model
from model.generate import generate
from model.io import load_pretrained


@pytest.fixture(autouse=True)
def _seeded():
    """Prompts come from the global RNG: fix it, so a test's inputs do not depend on test order."""
    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    reference = hf_model("llama", std=0.4)
    reference.save_pretrained(path)
    return reference, load_pretrained(path)


def test_greedy_and_beam_search_equal_transformers_for_a_decoder(llama_pair):
    reference, model = llama_pair
    ids = torch.randint(3, 96, (2, 5))
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert len(set(expected[:, 5:].flatten().tolist())) > 3  # not a degenerate repetition
    assert torch.equal(generate(model, ids, max_new_tokens=12), expected)
    beams = reference.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3, eos_token_id=None,
                               pad_token_id=0)
    assert torch.equal(generate(model, ids, max_new_tokens=6, num_beams=3), beams)


def test_greedy_equals_transformers_for_t5(tmp_path):
    reference = hf_model("t5", std=0.3)
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    ids = torch.randint(3, 96, (2, 7))
    expected = reference.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert len(set(expected[:, 1:].flatten().tolist())) > 3
    assert torch.equal(generate(model, ids, max_new_tokens=10), expected)


@pytest.mark.parametrize("overrides", [
    {"pos": "rope"},
    {"pos": "learned", "attn": "eager"},
    {"pos": "alibi", "sliding_window": 4},
    {"pos": "t5_bias"},
    {"arch": "encoder_decoder", "pos": "t5_bias"},
    {"arch": "encoder_decoder", "pos": "sinusoidal", "attn": "eager"},
    {"pos": "rope", "qk_norm": True, "attn_head_dim": 12},
    {"arch": "encoder_decoder", "pos": "t5_bias", "qk_norm": True},
    {"pos": "rope", "n_experts": 4, "experts_per_token": 2, "shared_expert_d_ff": 16},
])
def test_cached_decoding_equals_uncached_with_left_padding(overrides):
    model = build_model(tiny(init_std=0.3, **overrides))
    ids = torch.randint(3, 64, (2, 6))
    ids[0, :2] = 0
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    cached = generate(model, ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(cached, generate(model, ids, attention_mask=mask, max_new_tokens=8, use_cache=False))
    alone = generate(model, ids[:1, 2:], max_new_tokens=8)  # the left-padded row, unpadded
    if model.config.arch == "decoder":  # compare the new tokens
        cached, alone = cached[:, 6:], alone[:, 4:]
    assert torch.equal(cached[0], alone[0])


def test_stop_tokens_end_a_row_and_pad_the_rest():
    model = build_model(tiny(init_std=0.3))
    ids = torch.randint(3, 64, (2, 4))
    free = generate(model, ids, max_new_tokens=10)
    stop = int(free[0, 6])  # the third new token of row 0
    out = generate(model, ids, max_new_tokens=10, eos_token_ids=[stop], pad_token_id=63)
    first = (out[0, 4:] == stop).nonzero()[0, 0].item() + 4
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first + 1:] == 63).all()


def test_sampling_is_seeded_and_its_filters_reduce_to_greedy():
    model = build_model(tiny(init_std=0.05))
    ids = torch.randint(3, 64, (1, 4))
    a = generate(model, ids, max_new_tokens=20, temperature=2.0, seed=1)
    assert torch.equal(a, generate(model, ids, max_new_tokens=20, temperature=2.0, seed=1))
    assert not torch.equal(a, generate(model, ids, max_new_tokens=20, temperature=2.0, seed=2))
    greedy = generate(model, ids, max_new_tokens=10)
    assert torch.equal(generate(model, ids, max_new_tokens=10, temperature=1.5, top_k=1, seed=3), greedy)
    assert torch.equal(generate(model, ids, max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=3), greedy)


def test_bad_generation_requests_fail_with_one_line():
    with pytest.raises(UserError, match="generate needs a decoder or encoder_decoder LM"):
        generate(build_model(tiny(arch="encoder", pos="learned")), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(UserError, match="exceeds max_seq_len=32"):
        generate(build_model(tiny()), torch.ones(1, 30, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(UserError, match="top_p must be in"):
        generate(build_model(tiny()), torch.ones(1, 3, dtype=torch.long), top_p=0.0)
