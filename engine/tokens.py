"""Token positions of prompt words, from ComfyUI's own tokenization of the prompt.

The positions index the conditioning's sequence axis exactly as CLIPTextEncode builds it:
chunks of 77 tokens concatenated, weight syntax and embeddings handled by the tokenizer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..guidance.relations import RelationError


def _content(clip, name: str, chunks: Sequence[Sequence[tuple]]) -> list[tuple[int, object]]:
    """(position, token) for every token between a chunk's start and end token."""
    end = getattr(clip.tokenizer, f"clip_{name}").end_token
    out: list[tuple[int, object]] = []
    offset = 0
    for chunk in chunks:
        for i, pair in enumerate(chunk[1:], 1):
            tok = pair[0]
            if isinstance(tok, int) and tok == end:
                break
            out.append((offset + i, tok))
        offset += len(chunk)
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def encoder_family(clip) -> str:
    """'clip_l' (SD1), 'clip_h' (SD2), 'clip_g+clip_l' (SDXL): which tokenizers a CLIP has."""
    return "+".join(sorted(f"clip_{k}" for k in clip.tokenize("a")))


def sequence_length(clip, text: str) -> int:
    return max(sum(len(c) for c in chunks) for chunks in clip.tokenize(text).values())


def locate(clip, text: str, phrase: str, occurrence: int = 0, role: str = "object") -> tuple[int, ...]:
    """Positions of the tokens of `phrase` (its `occurrence`-th mention) in the encoded `text`."""
    full = clip.tokenize(text)
    alone = clip.tokenize(phrase)
    found: dict[str, tuple[int, ...]] = {}
    for name, chunks in full.items():
        needle = [t for _, t in _content(clip, name, alone[name][:1])]
        hay = _content(clip, name, chunks)
        if not needle:
            if phrase.startswith("embedding:"):
                raise RelationError(
                    f'{role} "{phrase}": no such embedding for this CLIP. Put the file in '
                    "ComfyUI's models/embeddings folder, or name the object by a word of the prompt.")
            raise RelationError(f'{role} "{phrase}" has no tokens for this CLIP. Use a word of the prompt.')
        hits = [i for i in range(len(hay) - len(needle) + 1)
                if all(_same(hay[i + j][1], needle[j]) for j in range(len(needle)))]
        if not hits:
            raise RelationError(
                f'{role} "{phrase}" does not appear in the prompt text. Use words that are in '
                f"the prompt (the same spelling), or add them to the prompt.")
        start = hits[min(occurrence, len(hits) - 1)]
        found[name] = tuple(hay[start + j][0] for j in range(len(needle)))
    positions = set(found.values())
    if len(positions) != 1:
        raise RelationError(f'The tokenizers of this CLIP disagree on where "{phrase}" is: {found}.')
    return positions.pop()
