import pytest
import torch
import yaml
from model_helpers import tiny

from common.errors import UserError
from model import build_model
from model.io import load_pretrained, resolve_checkpoint, save_pretrained
from model.lazy_weights import LazyTensor


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


def test_a_lazy_load_reads_each_block_when_it_is_materialised(tmp_path):
    model = build_model(tiny(n_layers=3, tie_embeddings=False))
    save_pretrained(model, tmp_path)
    lazy = load_pretrained(tmp_path, lazy=True)
    assert all(p.is_meta for p in lazy.parameters())
    reads: list[str] = []

    def counted(name: str, tensor: LazyTensor) -> LazyTensor:
        def load() -> torch.Tensor:
            reads.append(name)
            return tensor.load()

        return LazyTensor(tensor.shape, load)

    lazy.weights_source = {name: counted(name, t) for name, t in lazy.weights_source.items()}
    seen_at_block = []
    lazy.materialize("cpu", on_block=lambda block: seen_at_block.append(list(reads)))
    for i, seen in enumerate(seen_at_block):  # block i's tensors are read, block i+1's not yet
        assert any(n.startswith(f"stack.layers.{i}.") for n in seen)
        assert not any(n.startswith(f"stack.layers.{i + 1}.") for n in seen)
    assert sorted(reads) == sorted(model.state_dict())  # each tensor read once
    assert all(torch.equal(a, b) for a, b in zip(lazy.state_dict().values(), model.state_dict().values()))


def test_a_step_whose_model_files_are_gone_is_reported_truncated_not_unknown(tmp_path):
    from common.manifest import write_manifest

    step = tmp_path / "step_000003"
    save_pretrained(build_model(tiny()), step / "model")
    (step / "trainer_state.json").write_text("{}")
    write_manifest(step)
    (step / "model" / "model.yaml").unlink()
    assert resolve_checkpoint(step) == step / "model"
    with pytest.raises(UserError, match=r"truncated: model/model\.yaml is missing"):
        load_pretrained(step)
