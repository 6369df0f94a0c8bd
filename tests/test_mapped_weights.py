"""A checkpoint file's weights are memory-mapped and taken as they are, not read and copied (mpad.clip)."""

from __future__ import annotations

import torch

from mpad.clip import load_clip


def _in_mapping_of(tensor: torch.Tensor, path) -> bool:
    """Whether the tensor's memory lies in a mapping of `path` (/proc/self/maps)."""
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= tensor.data_ptr() < high:
                return True
    return False


def test_weights_of_the_model_dtype_are_the_mapped_file_and_others_are_cast(tmp_path, tiny_clip):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    loaded = load_clip("mpad-tiny", str(path))
    conv, norm = loaded.model.visual.conv1.weight, loaded.model.visual.transformer.resblocks[0].ln_1.weight
    assert _in_mapping_of(conv, path) and _in_mapping_of(norm, path)
    assert isinstance(conv, torch.nn.Parameter) and not conv.requires_grad
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), tiny_clip.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    half = load_clip("mpad-tiny", str(path), precision="bf16")  # cast like open_clip; LayerNorm stays fp32
    conv, norm = half.model.visual.conv1.weight, half.model.visual.transformer.resblocks[0].ln_1.weight
    assert conv.dtype == torch.bfloat16 and not _in_mapping_of(conv, path)
    assert torch.equal(conv, tiny_clip.model.visual.conv1.weight.bfloat16())
    assert norm.dtype == torch.float32 and _in_mapping_of(norm, path)

    # torch's own functions are back afterwards, and a legacy (non-zip) file, which cannot be mapped, still loads
    assert torch.load.__module__ == "torch.serialization" and torch.nn.Module.load_state_dict.__module__.startswith(
        "torch.nn"
    )
    legacy = tmp_path / "legacy.pt"
    torch.save(tiny_clip.model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    again = load_clip("mpad-tiny", str(legacy))
    assert torch.equal(again.model.visual.conv1.weight, tiny_clip.model.visual.conv1.weight)
