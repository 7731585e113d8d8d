"""The demo model's text path in training: token ids, token positions, a differentiable
CLIPTextEncode, and the end-of-text token swap.

Padding outputs are zero (DemoClip), and in training the end-of-text token's output is
swapped between captions of the batch, so no token but the object words themselves says
which objects the image holds.
"""
from __future__ import annotations

import random
import types

import torch

from . import world

END_TOKEN = 49407


def filler_vocabulary(tokenizer, rng: random.Random, n: int = 3000) -> tuple[str, ...]:
    """Whole words of the CLIP vocabulary, none of them a colour, shape or place word."""
    vocab = sorted(tokenizer.get_vocab())
    words = [w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isalpha() and 3 <= len(w) - 4 <= 9]
    words = [w for w in words if w not in world.RESERVED]
    return tuple(rng.sample(words, min(n, len(words))))


def token_ids(tokenizer, text: str) -> list[int]:
    """The 77 token ids of `text`; `tokenizer` is a ComfyUI CLIP or its tokenizer."""
    if not hasattr(tokenizer, "tokenize_with_weights"):  # a CLIP object
        tokenizer = tokenizer.tokenizer
    chunks = tokenizer.tokenize_with_weights(text)["l"]
    return [t for t, _ in chunks[0]]


def positions(ids: list[int], tokenizer, words: str) -> tuple[int, ...]:
    """Positions of the tokens of `words` in `ids` (first occurrence)."""
    needle = [t for t in token_ids(tokenizer, words)[1:] if t != END_TOKEN]
    for i in range(len(ids) - len(needle) + 1):
        if ids[i:i + len(needle)] == needle:
            return tuple(range(i, i + len(needle)))
    raise ValueError(f"{words!r} not in the caption")


def _residual_forward(layer, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without its in-place adds (autograd needs x)."""
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


def make_text_trainable(clip) -> None:
    """Give each CLIP layer of this CLIP object an out-of-place forward, same arithmetic."""
    for layer in clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers:
        layer.forward = types.MethodType(_residual_forward, layer)


def encode(clip, ids: list[list[int]]) -> torch.Tensor:
    """The conditioning CLIPTextEncode gives for these token ids (weights 1), with autograd.

    The same transformer call as ComfyUI's SDClipModel.forward, with the token ids of the
    whole batch embedded at once; ComfyUI zeroes the padding outputs in place, which
    autograd cannot follow, so the same mask (ones up to and including the first end token)
    is applied out of place. A tier-2 test checks the result equals CLIPTextEncode's."""
    encoder = clip.cond_stage_model.clip_l
    device = encoder.transformer.get_input_embeddings().weight.device
    tokens = torch.tensor(ids, device=device)
    ends = torch.tensor([t.index(END_TOKEN) for t in ids], device=device)
    outputs = encoder.transformer(tokens, None, intermediate_output=encoder.layer_idx,
                                  final_layer_norm_intermediate=encoder.layer_norm_hidden_state,
                                  dtype=torch.float32)
    z = (outputs[0] if encoder.layer == "last" else outputs[1]).float()
    mask = torch.arange(tokens.shape[1], device=device)[None] <= ends[:, None]
    return z * mask.unsqueeze(-1)


def swap_end_tokens(z: torch.Tensor, ids: list[list[int]], donors: list[int]) -> torch.Tensor:
    """Row r gets the end-token output of row donors[r] (captioned rows are shuffled
    among themselves by make_batch; an empty caption keeps its own)."""
    rows = [r for r, d in enumerate(donors) if d != r]
    if not rows:
        return z
    z = z.clone()
    z[rows, [ids[r].index(END_TOKEN) for r in rows]] = \
        z[[donors[r] for r in rows], [ids[donors[r]].index(END_TOKEN) for r in rows]]
    return z
