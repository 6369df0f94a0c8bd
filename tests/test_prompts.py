from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp_bounds import TEXT_BACKWARD_TERMS, TEXT_TERMS, assert_reordered_close

from mpad.prompts import (
    PromptLearner,
    TextEncoder,
    encode_tokens,
    learned_text_embeddings,
    meta_text_embeddings,
    text_embeddings_of,
)


@pytest.mark.numerics
@pytest.mark.parametrize("category", ["screw", "metal_nut"])
def test_prompt_with_real_words_equals_encode_text(tiny_clip, category):
    """The same sentences through TextEncoder (its shorter context) and encode_text: another summation order only
    (tests/fp_bounds.py)."""
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    learner = PromptLearner(model, tokenizer, category, n_general=4, n_normal=2, n_anomaly=3)
    learner.set_words(model, tokenizer, "a photo of a", "without defect", "with a scratch")
    words = category.replace("_", " ")
    sentences = [f"a photo of a {words} without defect.", f"a photo of a {words} with a scratch."]
    with torch.no_grad():
        embeddings, end_index = learner()
        got = TextEncoder(model)(embeddings, end_index)
        expected = model.encode_text(tokenizer(sentences))
    assert_reordered_close(got, expected, TEXT_TERMS)


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


def test_encode_tokens_equals_encode_text(tiny_clip):
    """Ensembles run only the tokens up to the longest sentence's end token: encode_text's values."""
    sentences = ["a photo of a metal nut.", "a jpeg corrupted photo of the metal nut for anomaly detection."]
    tokens = tiny_clip.tokenizer(sentences)
    with torch.no_grad():
        got, expected = encode_tokens(tiny_clip.model, tokens), tiny_clip.model.encode_text(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_meta_prompts_are_normalised_ensembles(tiny_clip):
    meta = meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "metal_nut")
    assert meta.shape == (2, 64)
    # The norm of an fp32-normalised 64-vector: 1 within ~(64 + 4) 2^-24 = 4e-6 < assert_close's 1e-5 + 1.3e-6.
    torch.testing.assert_close(meta.norm(dim=-1), torch.ones(2))
    single = tiny_clip.model.encode_text(tiny_clip.tokenizer(["a photo of a metal nut."]), normalize=True)[0]
    assert not torch.allclose(meta[0], single)
    assert (meta[0] - meta[1]).abs().max() > 1e-4


@pytest.mark.numerics
def test_short_context_has_the_full_context_values_and_gradients(tiny_clip):
    """TextEncoder runs only the tokens up to the end token; the causal mask makes that exact in real numbers.

    In fp32 the two paths differ by summation order only: the matmuls see 12 instead of 77 rows (other kernel
    blocking and vector tails) and attention sums 65 fewer exact zeros. So values and gradients agree within
    `fp_bounds.reorder_bound` of the text tower's forward (1.9e-4) and backward (3.7e-4) passes, relative to the
    largest value, not elementwise; a wrong shortcut (a token cut, a shifted position) changes them by O(1) of it.
    Observed (kernel sets of tests/fp_bounds.py): 5e-7 (forward) and 1.4e-6 (gradients) of the largest value.
    An AMD avx2 machine saw 3.66e-5 on one gradient element near 0, where the old elementwise rtol=1e-3 with
    atol=2e-5 failed (the largest |gradient| is 66).
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
    assert_reordered_close(short, full.detach(), TEXT_TERMS)
    assert_reordered_close(short_grad, full_grad, TEXT_BACKWARD_TERMS)


@pytest.mark.numerics
@pytest.mark.parametrize("sizes", [(4, 2, 3), (0, 1, 1)])
def test_shared_prefix_has_the_full_forward_values_and_gradients(tiny_clip, sizes):
    """forward_shared computes [SOT] G <class name> once for both prompts; in real numbers that is exact (causal
    mask), in fp32 another summation order only (other matmul shapes, the prefix's keys concatenated): the bounds
    of the test above, relative to the largest value. A suffix that missed the prefix's keys, a shifted position or
    a wrong end token changes the values by O(1) of it. Observed: 1.7e-6 (forward), 1.3e-6 (gradients) relative."""
    model = tiny_clip.model
    learner = PromptLearner(model, tiny_clip.tokenizer, "metal_nut", *sizes, generator=torch.Generator().manual_seed(1))
    encoder = TextEncoder(model)
    assert encoder.shares_prefix
    params = [p for p in (learner.general, learner.normal, learner.anomaly) if p.numel()]
    weights = torch.tensor([[1.0], [-2.0]])
    prefix, suffixes, end_index = learner.parts()
    shared, full = encoder.forward_shared(prefix[None], suffixes[None], end_index)[0], encoder(*learner())
    grads_shared = torch.autograd.grad((shared * weights).sum(), params)
    grads_full = torch.autograd.grad((full * weights).sum(), params)
    assert_reordered_close(shared.detach(), full.detach(), TEXT_TERMS)
    for got, expected in zip(grads_shared, grads_full, strict=True):
        assert_reordered_close(got, expected, TEXT_BACKWARD_TERMS)
    assert prefix.shape[0] == 1 + sizes[0] + learner.n_class and int(end_index.min()) >= prefix.shape[0]
    with torch.no_grad():  # training takes this path, and the prompts file stores what it gives
        torch.testing.assert_close(learned_text_embeddings(learner, encoder), F.normalize(shared.detach(), dim=-1))


@pytest.mark.numerics
@pytest.mark.parametrize("shared", [True, False])
def test_sets_of_vectors_in_one_pass_are_each_their_own_prompts(tiny_clip, monkeypatch, shared):
    """text_embeddings_of runs C sets of vectors through the tower together (the groups of forward_shared, or one
    batch): each set's values and gradients are those of its own pass within the text tower's summation-order
    bounds, and a gradient reaches only the set it comes from (exactly zero elsewhere). A set that used another's
    prefix or suffix would be off by O(1)."""
    model = tiny_clip.model
    learner = PromptLearner(
        model, tiny_clip.tokenizer, "metal_nut", 2, 1, 2, generator=torch.Generator().manual_seed(4)
    )
    encoder = TextEncoder(model)
    if not shared:
        monkeypatch.setattr(encoder, "shares_prefix", False)
    own = [learner.general, learner.normal, learner.anomaly]
    other = [(p.detach() + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i))).requires_grad_()
             for i, p in enumerate(own)]  # fmt: skip
    together = text_embeddings_of(learner, encoder, [own, other])
    assert together.shape == (2, 2, model.text_projection.shape[1])
    weights = torch.tensor([[[1.0], [-2.0]], [[0.5], [3.0]]])
    grads = torch.autograd.grad((together * weights).sum(), [*own, *other], retain_graph=True)
    for index, vectors in enumerate((own, other)):
        alone = text_embeddings_of(learner, encoder, [vectors])[0]
        expected = torch.autograd.grad((alone * weights[index]).sum(), vectors)
        assert_reordered_close(together[index].detach(), alone.detach(), TEXT_TERMS)
        for got, want in zip(grads[3 * index : 3 * index + 3], expected, strict=True):
            assert_reordered_close(got, want, TEXT_BACKWARD_TERMS)
    assert not torch.allclose(together[0], together[1], atol=1e-3)
    only_first = torch.autograd.grad(together[0].sum(), other, allow_unused=True)
    assert all(g is None or not g.any() for g in only_first)


def test_shared_prefix_needs_the_end_tokens_after_it(tiny_clip):
    learner = PromptLearner(tiny_clip.model, tiny_clip.tokenizer, "screw", 2, 1, 1)
    prefix, suffixes, end_index = learner.parts()
    with pytest.raises(ValueError, match="end tokens after the prefix"):
        TextEncoder(tiny_clip.model).forward_shared(prefix[None], suffixes[None], torch.tensor([1, end_index[1]]))


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
