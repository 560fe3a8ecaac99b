"""Rewards of online alignment: the built-ins, user callables, weighted sums and their one-line errors."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from common.errors import ConfigError, UserError
from trainer.rewards import build_rewards, last_boxed, resolve_reward

RECORD = {"prompt": "2+3=", "answer": "5", "level": 1}


def score(specs, completions, records=None, weights=()):
    rewards = build_rewards(specs, weights)
    records = records or [RECORD] * len(completions)
    names = [f"r{i}" for i in range(len(completions))]
    per_function = rewards.score(["p"] * len(completions), completions, records, names)
    return per_function, rewards.total(per_function)


def test_exact_match_compares_the_stripped_completion_with_the_answer():
    per_function, total = score(["exact_match"], ["5", " 5 \n", "55", "5 apples"])
    assert per_function[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert total.tolist() == [1.0, 1.0, 0.0, 0.0]
    numeric = {"answer": 12}  # answers that are JSON numbers compare as their text
    assert score(["exact_match"], ["12", "12.0"], [numeric, numeric])[1].tolist() == [1.0, 0.0]


def test_boxed_reads_the_last_balanced_box():
    assert last_boxed(r"so \boxed{3} no, \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("no box") is None
    _, total = score(["boxed"], [r"The sum is \boxed{5}.", r"\boxed{ 5 }", r"\boxed{6}", "5"])
    assert total.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_regex_searches_the_completion():
    _, total = score([r"regex:^\d+$"], ["42", "4 2", "x42"])
    assert total.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match=r"regex:\(unclosed is not a valid regular expression"):
        resolve_reward("regex:(unclosed")


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A user module on sys.path with well- and badly-behaved reward functions."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import math

        def length(prompt, completion, record):
            return len(completion) * record["level"]

        def boom(prompt, completion, record):
            if completion == "oops":
                raise ValueError("cannot parse " + completion)
            return 1.0

        def nan(prompt, completion, record):
            return math.nan

        def text(prompt, completion, record):
            return "1.0"

        def flag(prompt, completion, record):
            return completion.startswith("5")
    """))
    (tmp_path / "broken_rewards.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_module_function_gets_prompt_completion_and_record(reward_module):
    _, total = score([f"{reward_module}:length"], ["abc", ""], [{"level": 2}, {"level": 5}])
    assert total.tolist() == [6.0, 0.0]
    _, flags = score([f"{reward_module}:flag"], ["5", "6"])
    assert flags.tolist() == [1.0, 0.0]


def test_several_rewards_sum_with_weights(reward_module):
    specs = ["exact_match", r"regex:\d", f"{reward_module}:length"]
    per_function, total = score(specs, ["5", "x"], weights=[2.0, 0.5, -0.25])
    assert per_function.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    assert total.tolist() == [2.0 + 0.5 - 0.25, -0.25]
    with pytest.raises(ConfigError, match="2 weights for 3 rewards"):
        build_rewards(specs, [1.0, 2.0])


@pytest.mark.parametrize(("function", "message"), [
    ("boom", r"reward my_rewards:boom failed on r1: ValueError: cannot parse oops$"),
    ("nan", r"reward my_rewards:nan returned nan on r0; rewards must be finite numbers$"),
    ("text", r"reward my_rewards:text returned str '1.0' on r0; it must return a float$"),
])
def test_a_misbehaving_reward_is_one_line_naming_the_record(reward_module, function, message):
    spec = f"{reward_module}:{function}"
    completions = ["5", "oops"] if function == "boom" else ["5"]
    records = [RECORD, RECORD] if function == "boom" else [RECORD]
    with pytest.raises(UserError, match=message) as caught:
        score([spec] if function != "boom" else ["exact_match", spec], completions, records)
    assert "\n" not in str(caught.value)


def test_exact_match_without_an_answer_names_the_record():
    with pytest.raises(UserError, match="reward exact_match failed on r0: KeyError: the record has no 'answer' field"):
        score(["exact_match"], ["5"], [{"prompt": "2+3="}])


def test_bad_specs_fail_at_build_time(reward_module):
    with pytest.raises(ConfigError, match=r"module 'broken_rewards' does not import \(ModuleNotFoundError"):
        build_rewards(["broken_rewards:f"])
    with pytest.raises(ConfigError, match="module 'no_such_rewards_module' does not import"):
        build_rewards(["no_such_rewards_module:f"])
    with pytest.raises(ConfigError, match="module 'my_rewards' has no function 'missing'"):
        build_rewards([f"{reward_module}:missing"])
    with pytest.raises(ConfigError, match="'exactmatch' is not one of exact_match, boxed, regex:PATTERN"):
        build_rewards(["exactmatch"])
    with pytest.raises(ConfigError, match=r"align\.reward is not set"):
        build_rewards([])


def test_rewards_are_float64_per_function_and_finite():
    per_function, total = score(["exact_match", "boxed"], ["5"])
    assert per_function.dtype == torch.float64 and per_function.shape == (1, 2)
    assert all(math.isfinite(v) for v in total.tolist())


@pytest.fixture
def reward_model_dir(tmp_path):
    from model import build_model
    from model.config import ModelConfig
    from model.io import save_pretrained

    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder", vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32,
                      pos="rope", norm="rmsnorm", mlp="swiglu", n_labels=1)
    model = build_model(cfg, head="classifier")
    save_pretrained(model, tmp_path / "rm")
    save_pretrained(build_model(cfg), tmp_path / "lm")  # the same body with an LM head
    return tmp_path / "rm", tmp_path / "lm", model.eval()


def test_a_reward_model_scores_the_policys_tokens(reward_model_dir):
    rm_dir, lm_dir, model = reward_model_dir
    rewards = build_rewards([str(rm_dir), "exact_match"], [0.5, 1.0])
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    per_function = rewards.score(["p", "p"], ["5", "6"], [RECORD, RECORD], ["r0", "r1"], tokens=(ids, mask))
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)[:, 0].double()
    assert torch.allclose(per_function[:, 0], expected)
    assert per_function[:, 0].std() > 0
    total = 0.5 * expected + torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert rewards.total(per_function).tolist() == pytest.approx(total.tolist())
    with pytest.raises(ConfigError, match=r"is not a reward model \(train\.objective=reward makes one"):
        build_rewards([str(lm_dir)])
