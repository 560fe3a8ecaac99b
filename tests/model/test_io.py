import pytest
import torch
import yaml
from model_helpers import tiny

from common.errors import UserError
from model import build_model
from model.io import load_pretrained, resolve_checkpoint, save_pretrained


def test_save_load_round_trip_and_latest(tmp_path):
    model = build_model(tiny(pos="alibi", tie_embeddings=False))
    step = tmp_path / "checkpoints" / "step_00000010"
    save_pretrained(model, step)
    assert yaml.safe_load((step / "model.yaml").read_text())["head"] == "lm"
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010\n")
    assert resolve_checkpoint(tmp_path / "checkpoints") == step
    loaded = load_pretrained(tmp_path / "checkpoints")
    assert loaded.config == model.config
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    assert not list(step.glob(".*tmp*"))  # no temporary files left behind


def test_a_trainer_step_directory_resolves_to_its_model_subdirectory(tmp_path):
    step = tmp_path / "checkpoints" / "step_00000020"
    save_pretrained(build_model(tiny()), step / "model")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000020")
    assert resolve_checkpoint(step) == step / "model"
    assert resolve_checkpoint(tmp_path / "checkpoints") == step / "model"


def test_an_lm_checkpoint_loads_as_a_classifier_keeping_its_body(tmp_path):
    lm = build_model(tiny())
    save_pretrained(lm, tmp_path)
    clf = load_pretrained(tmp_path, head="classifier")
    assert torch.equal(clf.stack.layers[1].mlp.up.weight, lm.stack.layers[1].mlp.up.weight)
    assert clf(torch.randint(0, 64, (3, 5))).shape == (3, 1)


def test_damaged_or_missing_checkpoints_fail_with_one_line(tmp_path):
    save_pretrained(build_model(tiny()), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable safetensors file") as info:
        load_pretrained(tmp_path / "m")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        load_pretrained(tmp_path / "empty")
    save_pretrained(build_model(tiny()), tmp_path / "other")
    (tmp_path / "other" / "model.yaml").write_text(yaml.safe_dump({**tiny(d_ff=96).to_dict(), "head": "lm"}))
    with pytest.raises(UserError, match=r"weights do not match model\.yaml"):
        load_pretrained(tmp_path / "other")
