from __future__ import annotations

import pytest
import torch

from mpad.prompts import PromptLearner, TextEncoder, learned_text_embeddings, meta_text_embeddings


@pytest.mark.parametrize("category", ["screw", "metal_nut"])
def test_prompt_with_real_words_equals_encode_text(tiny_clip, category):
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    learner = PromptLearner(model, tokenizer, category, n_general=4, n_normal=2, n_anomaly=3)
    learner.set_words(model, tokenizer, "a photo of a", "without defect", "with a scratch")
    words = category.replace("_", " ")
    sentences = [f"a photo of a {words} without defect.", f"a photo of a {words} with a scratch."]
    with torch.no_grad():
        embeddings, end_index = learner()
        got = TextEncoder(model)(embeddings, end_index)
        expected = model.encode_text(tokenizer(sentences))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_only_the_context_vectors_learn(tiny_clip):
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    learner = PromptLearner(model, tokenizer, "screw", 2, 1, 1, generator=torch.Generator().manual_seed(0))
    assert {n for n, p in learner.named_parameters()} == {"general", "normal", "anomaly"}
    text = learned_text_embeddings(learner, TextEncoder(model))
    assert text.shape == (2, 64)
    text[1].sum().backward()
    assert learner.general.grad.abs().sum() > 0 and learner.anomaly.grad.abs().sum() > 0
    assert learner.normal.grad is None or learner.normal.grad.abs().sum() == 0  # LNP not in the anomaly row
    assert all(p.grad is None for p in model.parameters())


def test_same_generator_same_init(tiny_clip):
    make = lambda seed: PromptLearner(  # noqa: E731
        tiny_clip.model, tiny_clip.tokenizer, "screw", 4, 2, 2, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(make(3).general, make(3).general)
    assert not torch.equal(make(3).general, make(4).general)


def test_meta_prompts_are_normalised_ensembles(tiny_clip):
    meta = meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "metal_nut")
    assert meta.shape == (2, 64)
    torch.testing.assert_close(meta.norm(dim=-1), torch.ones(2))
    single = tiny_clip.model.encode_text(tiny_clip.tokenizer(["a photo of a metal nut."]), normalize=True)[0]
    assert not torch.allclose(meta[0], single)
    assert (meta[0] - meta[1]).abs().max() > 1e-4


@pytest.mark.numerics
def test_short_context_has_the_full_context_values_and_gradients(tiny_clip):
    """TextEncoder runs only the tokens up to the end token; the causal mask makes that exact in real numbers.

    In fp32 the two paths differ by summation order only: the matmuls see 12 instead of 77 rows (other kernel
    blocking and vector tails) and attention sums 65 fewer exact zeros. Two orders of a length-K sum differ by at
    most 2 K u sum|a b| (u = 2^-24), and sum|a b| is of the size of the values themselves (LayerNorm'd inputs,
    unit-scale weights), so the error is bounded relative to the largest value of the output, not elementwise:
    the forward pass holds 3 blocks x (128 + 32 + 77 + 128 + 128 + 512) + 128 = 3143 reduction terms on the way,
    2 x 3143 x 2^-24 = 3.7e-4; the backward pass about twice that, 7.5e-4. Bounds of 5e-4 and 1e-3 x the largest
    |value|: a wrong shortcut (a token cut, a shifted position) changes values by O(1) of that.
    Checked with ATEN_CPU_CAPABILITY=default, avx2 and native avx512 (Xeon with avx512_bf16 and AMX; 1 and 2
    threads) and with oneDNN limited to AVX2: observed 3e-7 (forward) and 1.4e-6 (gradients) of the largest value;
    an AMD avx2 machine saw 3.66e-5 on one gradient element whose own value was near 0 (the old elementwise
    rtol=1e-3, atol=2e-5 failed there).
    """
    model = tiny_clip.model
    generator = torch.Generator().manual_seed(0)
    learner = PromptLearner(model, tiny_clip.tokenizer, "metal_nut", 4, 2, 3, generator=generator)
    encoder = TextEncoder(model)
    weights = torch.tensor([[1.0], [-2.0]])
    (encoder(*learner()) * weights).sum().backward()
    short_grad = learner.general.grad.clone()
    learner.zero_grad()
    embeddings, end_index = learner()
    x = model.transformer(embeddings + model.positional_embedding, attn_mask=model.attn_mask)
    full = model.ln_final(x)[torch.arange(2), end_index] @ model.text_projection
    (full * weights).sum().backward()
    with torch.no_grad():
        short = encoder(*learner())
    full_grad = learner.general.grad
    assert int(end_index.max()) + 1 < embeddings.shape[1]  # the shortcut was taken
    torch.testing.assert_close(short, full.detach(), rtol=0, atol=5e-4 * float(full.abs().max()))
    torch.testing.assert_close(short_grad, full_grad, rtol=0, atol=1e-3 * float(full_grad.abs().max()))


def test_prompts_longer_than_the_context_are_refused(tiny_clip):
    import pytest

    with pytest.raises(
        ValueError,
        match=r"prompts too long: 100 general \+ 2 class-name tokens .* = 107 tokens, "
        r"the text encoder's context holds 77",
    ):
        PromptLearner(tiny_clip.model, tiny_clip.tokenizer, "metal_nut", 100, 2, 2)
    # The longest prompt that fits: 77 tokens exactly.
    PromptLearner(tiny_clip.model, tiny_clip.tokenizer, "metal_nut", 70, 2, 2)
