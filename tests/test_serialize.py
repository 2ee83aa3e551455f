"""cait.save / cait.load: round trips for several families, the stored config, and refusals."""
import json

import pytest
import torch
from safetensors.torch import save_file

import cait
from cait.serialize import read_config
from models import build, images_for


@pytest.mark.parametrize("model_id, merge, prune", [
    ("deit_distilled", cait.ATME(flops=0.7), cait.CDCP(qk=0.5, v=0.75, mlp=0.75)),
    ("registers_avg", cait.ATME(r=20, block=4), cait.CDCP(mlp=0.5)),
    ("odd_grid", cait.ATME(flops=0.8), None),
    ("deit3_layerscale", None, cait.CDCP(v=0.5)),
    ("non_square", None, None),
])
def test_round_trip_gives_the_same_outputs(tmp_path, model_id, merge, prune):
    model = build(model_id)
    fast = cait.compress(model, merge=merge, prune=prune).eval()
    path = tmp_path / "model.safetensors"
    cait.save(fast, path)
    loaded = cait.load(path)
    images = images_for(model, 2)
    assert not loaded.training and loaded.schedule == fast.schedule
    assert [b.kept for b in loaded.blocks] == [b.kept for b in fast.blocks]
    with torch.no_grad():
        assert torch.equal(loaded(images), fast(images))
        assert torch.equal(loaded.forward_dense(images), fast.forward_dense(images))


def test_config_names_the_architecture_and_schedule(tmp_path):
    fast = cait.compress(build("deit_tiny"), merge=cait.ATME(r=3), prune=cait.CDCP(qk=0.5))
    cait.save(fast, tmp_path / "m.safetensors")
    config = read_config(tmp_path / "m.safetensors")
    assert config["timm"]["name"] == "deit_tiny_patch16_224"
    assert config["schedule"] == [3] * 12 and config["tile"] == 2
    assert len(config["kept"][0]["qk"]) == 3 and config["kept"][0]["v"] is None
    json.dumps(config)


def test_refusals(tmp_path):
    with pytest.raises(TypeError, match="made by cait.compress"):
        cait.save(build("deit_tiny"), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        cait.load(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no cait config"):
        cait.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        cait.load(tmp_path / "junk.safetensors")
