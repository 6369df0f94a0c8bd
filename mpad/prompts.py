"""Learnable prompts (paper eq. 1) and the hand-written meta prompts that start MPTS (sec. 3.3).

CoOp-style split: `PromptLearner` holds the learnable vectors as parameters and the fixed token
embeddings (start token, class-name tokens, end of sentence and padding) as buffers; `TextEncoder`
takes token embeddings, not token ids, and runs open_clip's text tower on them exactly as
`CLIP.encode_text` does (positional embedding, causal transformer, ln_final, end-token pooling,
projection).

    LNP = [SOT] G1..Gng  <class name>  N1..Nnr  . [EOT]
    LAP = [SOT] G1..Gng  <class name>  A1..Ana  . [EOT]

The prefix G is shared by both prompts; N and A are the normal / anomaly suffixes (docs/method.md#prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import torch
import torch.nn.functional as F
from torch import nn

from mpad.blocks import merge_heads, plain_blocks, split_heads
from mpad.text_cache import TextCache

# WinCLIP's template ensemble and state words: the initial meta prompts (MNP / MAP).
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALY_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")


def class_words(category: str) -> str:
    """Folder name -> words for the prompt: `metal_nut` -> `metal nut`."""
    return category.replace("_", " ").strip()


def _text_tower(model: nn.Module) -> nn.Module:
    """open_clip's `CLIP` keeps the text tower's parts on the model; `CustomTextCLIP` in `model.text`."""
    return model.text if hasattr(model, "text") else model


def end_token_index(tokens: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(N, L) token ids -> (N,) position whose output `encode_text` pools (open_clip's text_global_pool)."""
    tower = _text_tower(model)
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        return (tokens == tower.text_eos_id).int().argmax(dim=-1)
    if pool == "last":
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
    if pool == "first":
        return torch.zeros(tokens.shape[0], dtype=torch.long)
    raise ValueError(f"unsupported text pooling {pool!r}")


class TextEncoder(nn.Module):
    """open_clip's text tower on token embeddings: (N, L, width) + end positions (N,) -> (N, D), not normalised."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        tower = _text_tower(model)
        self.transformer = tower.transformer
        self.positional_embedding = tower.positional_embedding
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        # `forward_shared` rebuilds open_clip's ResidualAttentionBlock around its own modules: only for that block
        # with a plain causal self-attention (the other text towers take `forward`).
        self.shares_prefix = self.attn_mask is not None and plain_blocks(self.transformer)

    def forward(self, embeddings: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        """Only the first max(end_index) + 1 tokens are run: with the causal mask the pooled end-token output
        never sees the padding after it, and prompts are far shorter than the context (several x less work)."""
        dtype = self.transformer.get_cast_dtype()
        length = embeddings.shape[1]
        mask = self.attn_mask
        if mask is not None:
            length = min(length, int(end_index.max()) + 1)
            mask = mask[:length, :length]
        x = embeddings[:, :length].to(dtype) + self.positional_embedding[:length].to(dtype)
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), end_index]
        return self._project(x)

    def forward_shared(self, prefix: torch.Tensor, suffixes: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        """`forward` of the sequences cat([prefix[g], suffixes[g, i]]), each prefix computed once: prefix (G, P, width),
        suffixes (G, N, L - P, width), end_index (N,), each >= P -> (G, N, D), not normalised.

        With the causal mask a position sees only the ones before it, so the hidden states of a shared prefix are
        the same in every sequence: each block runs a group's prefix rows once and lets each of the group's
        suffixes attend to their keys and values. The learned prompts share [SOT] G1..Gng <class name> (eq. 1): 6-7
        of their ~10 positions, so about a third less work in the text tower, forwards and backwards (equal to
        `forward` to float rounding, tested). Groups (G > 1) run several sets of prompts in the same matrix
        products (`text_embeddings_of`). Needs `shares_prefix`."""
        if not self.shares_prefix or int(end_index.min()) < prefix.shape[1]:
            raise ValueError("forward_shared: a plain causal text tower and end tokens after the prefix")
        dtype = self.transformer.get_cast_dtype()
        groups, n_prefix, width = prefix.shape
        length = int(end_index.max()) + 1
        xp = prefix.to(dtype) + self.positional_embedding[:n_prefix].to(dtype)
        xs = suffixes[:, :, : length - n_prefix].to(dtype) + self.positional_embedding[n_prefix:length].to(dtype)
        n, n_suffix = xs.shape[1:3]
        causal_p = torch.ones(n_prefix, n_prefix, dtype=torch.bool, device=xp.device).tril()
        causal_s = torch.ones(n_suffix, n_suffix, dtype=torch.bool, device=xp.device).tril()
        mask_s = torch.cat([causal_s.new_ones(n_suffix, n_prefix), causal_s], dim=1)
        rows = torch.cat([xp.reshape(groups * n_prefix, width), xs.reshape(groups * n * n_suffix, width)])
        for block in self.transformer.resblocks:  # every distinct position once
            rows = _shared_block(block, rows, groups, n_prefix, n, causal_p, mask_s)
        x = self.ln_final(rows[groups * n_prefix :].reshape(groups, n, n_suffix, width))
        return self._project(x[:, torch.arange(n, device=x.device), end_index - n_prefix])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection


def _shared_block(
    block: nn.Module,
    rows: torch.Tensor,
    groups: int,
    n_prefix: int,
    n: int,
    causal_p: torch.Tensor,
    mask_s: torch.Tensor,
) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock on rows (G * P + G * N * S, width): G prefixes of P rows, then G groups of
    N suffixes of S rows each, every suffix attending to its group's prefix's keys and values and causally to its
    own."""
    attn, width = block.attn, rows.shape[1]
    split = groups * n_prefix
    # One in-projection over all rows (one matrix product), then the prefixes and the suffixes apart.
    q, k, v = F.linear(block.ln_1(rows), attn.in_proj_weight, attn.in_proj_bias).split(width, dim=-1)
    qp, kp, vp = (split_heads(t[:split].reshape(groups, n_prefix, width), attn.num_heads) for t in (q, k, v))
    qs, ks, vs = (split_heads(t[split:].reshape(groups * n, -1, width), attn.num_heads) for t in (q, k, v))
    out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=causal_p)
    ks, vs = (torch.cat([shared.repeat_interleave(n, dim=0), own], dim=2) for shared, own in ((kp, ks), (vp, vs)))
    out_s = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask_s)
    out = torch.cat([merge_heads(out_p).reshape(split, width), merge_heads(out_s).reshape(-1, width)])
    rows = rows + block.ls_1(attn.out_proj(out))
    return rows + block.ls_2(block.mlp(block.ln_2(rows)))


class PromptLearner(nn.Module):
    """The learnable normal / anomaly prompts of eq. 1 for one class name.

    Parameters: `general` (ng, width), `normal` (nr, width), `anomaly` (na, width), fp32, initialised
    N(0, 0.02^2) from the CPU `generator` (CoOp). Buffers: the embeddings of the fixed tokens.
    `forward()` -> (2, L, width) token embeddings [LNP, LAP] and (2,) end-token positions.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        category: str,
        n_general: int,
        n_normal: int,
        n_anomaly: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if min(n_general, n_normal, n_anomaly) < 0 or max(n_normal, n_anomaly) < 1:
            raise ValueError("prompt sizes: n_general >= 0 and n_normal, n_anomaly >= 1")
        tower = _text_tower(model)
        self.category = category
        width = tower.token_embedding.weight.shape[1]
        self.n_class = len(_word_tokens(tokenizer, class_words(category)))
        self.sizes = (n_general, n_normal, n_anomaly)
        rows = []
        end_index = []
        for n_state in (n_normal, n_anomaly):
            # "X" placeholders mark where learned vectors go; the tokenizer adds SOT/EOT and padding.
            text = " ".join(["X"] * n_general + [class_words(category)] + ["X"] * n_state) + "."
            tokens = tokenizer([text])
            needed = 1 + n_general + self.n_class + n_state + 2  # [SOT] G.. class .. N/A.. "." [EOT]
            if needed > tokens.shape[1]:  # the tokenizer would cut it: both prompts would end alike
                raise ValueError(
                    f"prompts too long: {n_general} general + {self.n_class} class-name tokens ({category!r}) + "
                    f"{n_state} state + 3 fixed = {needed} tokens, the text encoder's context holds "
                    f"{tokens.shape[1]}; lower prompts.n_general / n_normal / n_anomaly"
                )
            rows.append(tower.token_embedding(tokens.to(tower.token_embedding.weight.device))[0])
            end_index.append(end_token_index(tokens, model)[0])
        embedded = torch.stack(rows).detach()  # (2, L, width)
        ng, nc = n_general, self.n_class
        self.register_buffer("sot", embedded[:, :1].clone())
        self.register_buffer("class_tokens", embedded[0, 1 + ng : 1 + ng + nc].clone())
        self.register_buffer("normal_tail", embedded[0, 1 + ng + nc + n_normal :].clone())
        self.register_buffer("anomaly_tail", embedded[1, 1 + ng + nc + n_anomaly :].clone())
        self.register_buffer("end_index", torch.stack(end_index).long())

        # Drawn on the CPU (`generator` is a CPU generator) and moved: the same seed gives the same initial
        # prompts on any device. The vectors are fp32 whatever the tower's precision (Adam's state too).
        def draw(n: int) -> nn.Parameter:
            return nn.Parameter((torch.randn(n, width, generator=generator) * 0.02).to(embedded.device))

        self.general, self.normal, self.anomaly = draw(n_general), draw(n_normal), draw(n_anomaly)

    def forward(self, vectors: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        prefix, suffixes, end_index = self.parts(vectors)
        return torch.cat([prefix.expand(2, -1, -1), suffixes], dim=1), end_index

    def parts(self, vectors: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts as their shared prefix [SOT] G <class name> (P, width), their suffixes (2, L - P, width)
        [N.. . [EOT] pad, A.. . [EOT] pad] and the (2,) end-token positions (`TextEncoder.forward_shared`).
        `vectors`: other (general, normal, anomaly) vectors in place of the learner's own."""
        general, normal, anomaly = (self.general, self.normal, self.anomaly) if vectors is None else vectors
        prefix = torch.cat([self.sot[0], general, self.class_tokens])
        suffixes = torch.stack([torch.cat([normal, self.normal_tail]), torch.cat([anomaly, self.anomaly_tail])])
        return prefix, suffixes, self.end_index

    def set_words(self, model: nn.Module, tokenizer, general: str, normal: str, anomaly: str) -> None:
        """Set the learnable vectors to the token embeddings of real words (token counts must match)."""
        tower = _text_tower(model)
        for param, words in ((self.general, general), (self.normal, normal), (self.anomaly, anomaly)):
            ids = _word_tokens(tokenizer, words).to(param.device)
            if len(ids) != param.shape[0]:
                raise ValueError(f"{words!r} is {len(ids)} tokens, the prompt holds {param.shape[0]}")
            with torch.no_grad():
                param.copy_(tower.token_embedding(ids))


def _word_tokens(tokenizer, words: str) -> torch.Tensor:
    """Token ids of `words` without start/end/padding tokens."""
    tokens = tokenizer([words])[0]
    sot, eot = int(tokens[0]), int(tokens.max())
    return tokens[(tokens != 0) & (tokens != sot) & (tokens != eot)]


def learned_text_embeddings(learner: PromptLearner, encoder: TextEncoder) -> torch.Tensor:
    """(2, D) L2-normalised text embeddings [normal, anomaly] of the learned prompts (differentiable)."""
    return text_embeddings_of(learner, encoder, [(learner.general, learner.normal, learner.anomaly)])[0]


def text_embeddings_of(
    learner: PromptLearner, encoder: TextEncoder, vector_sets: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor:
    """(C, 2, D) L2-normalised text embeddings [normal, anomaly] of the learner's prompts with each of C sets of
    (general, normal, anomaly) vectors, in one pass of the text tower (its weights read once for all C)."""
    if encoder.shares_prefix:
        prefixes, suffixes, end_index = zip(*(learner.parts(vectors) for vectors in vector_sets), strict=True)
        features = encoder.forward_shared(torch.stack(prefixes), torch.stack(suffixes), end_index[0])
    else:
        embeddings, end_index = zip(*(learner(vectors) for vectors in vector_sets), strict=True)
        features = encoder(torch.cat(embeddings), torch.cat(end_index)).reshape(len(vector_sets), 2, -1)
    return F.normalize(features.float(), dim=-1)  # fp32 whatever the tower's precision


def encode_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) token ids -> (N, D) text features, not normalised: `encode_text`'s values through `TextEncoder`,
    which runs only the positions up to the last end token. An ensemble's sentences take some 15 of the 77
    positions, so this is several times less work than `encode_text` (equal to float rounding, tested)."""
    tower = _text_tower(model)
    if not hasattr(tower, "token_embedding"):  # a text tower of another kind (Hugging Face): open_clip's own path
        return model.encode_text(tokens)
    return TextEncoder(model)(tower.token_embedding(tokens), end_token_index(tokens, model))


@torch.no_grad()
def text_ensemble(
    model: nn.Module, tokenizer, sentences: Sequence[str], cache: TextCache | None = None
) -> torch.Tensor:
    """(D,) the re-normalised mean of the normalised text embeddings of `sentences` (a prompt ensemble), fp32;
    read from / stored in `cache` when one is given."""
    device = next(model.parameters()).device

    def compute(batch: list[str]) -> torch.Tensor:
        features = F.normalize(encode_tokens(model, tokenizer(batch).to(device)).float(), dim=-1)
        return F.normalize(features.mean(dim=0), dim=-1)

    return compute(list(sentences)) if cache is None else cache.ensemble(sentences, compute).to(device)


def meta_text_embeddings(model: nn.Module, tokenizer, category: str, cache: TextCache | None = None) -> torch.Tensor:
    """(2, D) the initial meta prompts MNP / MAP: the ensembles of every template x state-word sentence
    (WinCLIP's prompt ensemble)."""
    words = class_words(category)
    return torch.stack(
        [
            text_ensemble(model, tokenizer, [t.format(s.format(words)) for t, s in product(TEMPLATES, states)], cache)
            for states in (NORMAL_STATES, ANOMALY_STATES)
        ]
    )
