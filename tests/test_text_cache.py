"""The prompt-ensemble cache: same values as computing, computed once, keyed by everything the model depends on."""

from __future__ import annotations

import os

import torch

from mpad import prompts
from mpad.clip import load_clip
from mpad.prompts import meta_text_embeddings
from mpad.text_cache import TextCache


def _counting(bundle, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = prompts.encode_tokens

    def encode_tokens(model, tokens):
        calls.append(len(tokens))
        return original(model, tokens)

    monkeypatch.setattr(prompts, "encode_tokens", encode_tokens)
    return calls


def test_cached_ensembles_equal_computed_ones_and_run_the_tower_once(tmp_path, tiny_clip, monkeypatch):
    plain = meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "metal_nut")
    calls = _counting(tiny_clip, monkeypatch)
    cache = TextCache.for_bundle(tiny_clip, tmp_path)
    first = meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "metal_nut", cache)
    assert len(calls) == 2 and cache.path.is_file()
    # A new process (a new TextCache object) reads the file back: no text tower run, bit-identical values.
    again = meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "metal_nut", TextCache(cache.path))
    assert len(calls) == 2
    assert torch.equal(first, plain) and torch.equal(again, plain)
    meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "screw", TextCache(cache.path))
    assert len(calls) == 4  # another class name: other sentences


def test_key_changes_with_precision_and_weights_file(tmp_path, tiny_clip):
    paths = {
        TextCache.for_bundle(tiny_clip, tmp_path).path,
        TextCache.for_bundle(load_clip("mpad-tiny", "none", precision="bf16"), tmp_path).path,
    }
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), checkpoint)
    from_file = TextCache.for_bundle(load_clip("mpad-tiny", str(checkpoint)), tmp_path).path
    os.utime(checkpoint, ns=(1, 1))  # the same path with other contents (a re-downloaded checkpoint)
    touched = TextCache.for_bundle(load_clip("mpad-tiny", str(checkpoint)), tmp_path).path
    assert len(paths | {from_file, touched}) == 4


def test_damaged_cache_file_is_recomputed(tmp_path, tiny_clip, monkeypatch):
    cache = TextCache.for_bundle(tiny_clip, tmp_path)
    cache.path.write_bytes(b"not a torch file")
    calls = _counting(tiny_clip, monkeypatch)
    value = meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "disc", cache)
    assert len(calls) == 2 and value.shape == (2, tiny_clip.model.text_projection.shape[1])
    assert torch.equal(meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "disc", TextCache(cache.path)), value)
