from __future__ import annotations

import pytest
import torch

from mpad.clip import ModelLoadError, backbone_identity, load_clip


def test_tiny_model_is_registered_and_small(tiny_clip):
    assert tiny_clip.image_size == (64, 64)
    assert tiny_clip.random_weights and tiny_clip.pretrained == "none"
    assert tuple(tiny_clip.model.visual.grid_size) == (8, 8)
    assert sum(p.numel() for p in tiny_clip.model.parameters()) < 10_000_000


def test_random_weights_are_the_same_in_every_build(tiny_clip):
    again = load_clip("mpad-tiny", "none")
    for (name, a), (_, b) in zip(tiny_clip.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_file_roundtrip(tmp_path, tiny_clip):
    # Perturb the weights so that loading the file is distinguishable from the seeded random init.
    torch.manual_seed(1)
    model = load_clip("mpad-tiny", "none").model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = load_clip("mpad-tiny", str(path))
    assert not loaded.random_weights and loaded.pretrained == str(path)
    images = torch.randn(2, 3, 64, 64)
    tokens = loaded.tokenizer(["a photo of a screw", "a damaged screw"])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.model.encode_text(tokens), model.encode_text(tokens))
        assert not torch.allclose(loaded.model.encode_image(images), tiny_clip.model.encode_image(images))
    assert backbone_identity(loaded)["name"] == "mpad-tiny"


def test_unknown_names_and_tags_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model.name 'ViT-Nope'"):
        load_clip("ViT-Nope", "none")
    with pytest.raises(ModelLoadError, match="not a pretrained tag.*laion400m_e32"):
        load_clip("ViT-B-16-plus-240", "no_such_tag")
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        load_clip("mpad-tiny", str(tmp_path / "missing.pt"))


def test_known_tag_without_network_says_how_to_use_a_file(monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights: no network")

    monkeypatch.setattr(open_clip.factory, "create_model", offline)
    monkeypatch.setattr("open_clip.create_model", offline)
    with pytest.raises(ModelLoadError, match="local file path"):
        load_clip("ViT-B-16-plus-240", "laion400m_e32")


def test_loaded_weights_are_not_initialised_first(tmp_path, tiny_clip, monkeypatch):
    calls = []
    original = torch.nn.init.normal_

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", counting)
    load_clip("mpad-tiny", "none")
    assert calls, "random weights come from nn.init"
    calls.clear()
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    loaded = load_clip("mpad-tiny", str(path))
    assert calls == []
    assert torch.nn.init.normal_ is counting and torch.nn.Linear.reset_parameters is not None
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), tiny_clip.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # Layers built afterwards are initialised again.
    assert torch.nn.Linear(4, 4).weight.abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp8", "half", "FP16", ""])
def test_unknown_precision_is_refused(precision):
    with pytest.raises(ModelLoadError, match=r"model.precision = .*must be one of fp32, fp16, bf16"):
        load_clip("mpad-tiny", "none", precision=precision)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_casts_like_open_clip(precision, dtype):
    bundle = load_clip("mpad-tiny", "none", precision=precision)
    visual = bundle.model.visual
    assert bundle.compute_dtype == dtype and visual.conv1.weight.dtype == dtype
    assert visual.transformer.resblocks[0].ln_1.weight.dtype == torch.float32  # LayerNorm stays fp32
    assert visual.positional_embedding.dtype == torch.float32


def test_a_file_that_is_not_a_checkpoint_is_one_clear_error(tmp_path, tiny_clip):
    text = tmp_path / "weights.pt"
    text.write_text("<html>not a checkpoint</html>")
    with pytest.raises(ModelLoadError, match=r"model.pretrained = .*weights.pt': not a checkpoint of mpad-tiny") as err:
        load_clip("mpad-tiny", str(text))
    # what the file is, in a line a terminal shows whole; not torch's paragraph about weights_only
    assert "neither a torch zip archive, a pickle nor a safetensors file" in str(err.value)
    assert len(str(err.value)) < len(str(text)) + 200 and "weights_only" not in str(err.value)
    other = tmp_path / "other.pt"
    torch.save({"something": torch.zeros(2)}, other)  # a state dict of another model
    with pytest.raises(ModelLoadError, match="not a checkpoint of mpad-tiny"):
        load_clip("mpad-tiny", str(other))
