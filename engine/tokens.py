"""Token positions of prompt words, from ComfyUI's own tokenization of the prompt.

A position is a row of the conditioning exactly as CLIPTextEncode builds it for this CLIP
(engine/text_contexts.py: CLIP chunks of 77 tokens; Flux's and Chroma's T5 context; SD3's
CLIP rows followed by T5's rows). Weight syntax and embeddings are handled by ComfyUI's
tokenizers; the positions are found in their output:

- CLIP rows: the phrase's own tokens (a needle) are searched in the prompt's tokens, as
  CLIP's BPE splits a word the same way wherever it stands; embeddings are matched by value.
  With two CLIP tokenizers on the same rows (SDXL, SD3) both must agree.
- T5 rows: sentencepiece pieces are joined back into text ("\u2581" = a space) and the phrase is
  found there as whole words, by the rule that numbers a phrase's mentions in the relation
  parser (guidance/relations.py), so "cat,dog" (T5: "\u2581cat", ",", "dog") or "Cat" are found
  although the pieces differ from the phrase's own. A position is every piece that carries
  a character of the mention; a piece that is only the word-start mark "\u2581" is not.
  An embedding reaches T5's rows only when its file holds vectors of T5's width (CLIP
  embeddings do not: ComfyUI drops them from T5's rows, and the rows after them move up);
  an "embedding:name" object is then found in the CLIP rows only.

SD3: an object is the group of its CLIP rows and its T5 rows together (as GSN averages the
CLIP and T5 parts of its maps); `locate_parts` gives the two apart. An embedding object has
its CLIP rows only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..guidance.relations import RelationError, mention_spans
from . import text_contexts
from .text_contexts import Segment

_EMBEDDING = "embedding:"


def _content(clip, key: str, chunks: Sequence[Sequence[tuple]]) -> list[tuple[int, object]]:
    """(position, token) for every token between a CLIP chunk's start and end token."""
    end = text_contexts.sub_tokenizer(clip, key).end_token
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


def _not_in_prompt(role: str, phrase: str) -> RelationError:
    return RelationError(f'{role} "{phrase}" does not appear in the prompt text. Use words that are in '
                         f"the prompt (the same spelling), or add them to the prompt.")


def _clip_rows(clip, segment: Segment, full: dict, phrase: str, occurrence: int, role: str) -> tuple[int, ...]:
    alone = clip.tokenize(phrase)
    found: dict[str, tuple[int, ...]] = {}
    for key in segment.keys:
        needle = [t for _, t in _content(clip, key, alone[key][:1])]
        hay = _content(clip, key, full[key])
        if not needle:
            if phrase.startswith(_EMBEDDING):
                raise RelationError(
                    f'{role} "{phrase}": no such embedding for this CLIP. Put the file in '
                    "ComfyUI's models/embeddings folder, or name the object by a word of the prompt.")
            raise RelationError(f'{role} "{phrase}" has no tokens for this CLIP. Use a word of the prompt.')
        hits = [i for i in range(len(hay) - len(needle) + 1)
                if all(_same(hay[i + j][1], needle[j]) for j in range(len(needle)))]
        if not hits:
            raise _not_in_prompt(role, phrase)
        start = hits[min(occurrence, len(hits) - 1)]
        found[key] = tuple(hay[start + j][0] for j in range(len(needle)))
    positions = set(found.values())
    if len(positions) != 1:
        raise RelationError(f'The tokenizers of this CLIP disagree on where "{phrase}" is: {found}.')
    rows = positions.pop()
    if max(rows) >= segment.length:  # SD3 cuts CLIP-L and CLIP-G to the shorter one
        raise RelationError(f'{role} "{phrase}" lies past the CLIP rows this model reads ({segment.length}); '
                            "move it nearer the start of the prompt.")
    return rows


def _t5_width(clip) -> int | None:
    """Width of the T5 encoder's token embeddings (None when it cannot be read)."""
    encoder = getattr(getattr(clip, "cond_stage_model", None), text_contexts.T5, None)
    try:
        return int(encoder.transformer.get_input_embeddings().weight.shape[-1])
    except (AttributeError, IndexError, TypeError):
        return None


def t5_rows(clip, key: str, chunks: Sequence[Sequence[tuple]]) -> list[object]:
    """T5's tokens as they become rows: up to the end token, without embedding vectors whose
    width is not T5's (the encoder drops those, and the rows after them move up)."""
    sub = text_contexts.sub_tokenizer(clip, key)
    width = _t5_width(clip) or sub.embedding_size
    rows: list[object] = []
    for tok, *_ in (t for chunk in chunks for t in chunk):
        if isinstance(tok, int):
            if tok == sub.end_token:
                break
            rows.append(tok)
        elif isinstance(tok, torch.Tensor) and tok.shape[-1] == width:
            rows.append(tok)
    return rows


def t5_text(clip, key: str, rows: Sequence[object]) -> tuple[str, list[tuple[int, int]]]:
    """The text T5's pieces spell, and each row's character span in it (an embedding vector
    spells a space)."""
    sub = text_contexts.sub_tokenizer(clip, key)
    text, spans = "", []
    for tok in rows:
        piece = sub.inv_vocab.get(tok, "").replace("\u2581", " ") if isinstance(tok, int) else " "
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def _t5_rows(clip, segment: Segment, full: dict, phrase: str, occurrence: int, role: str) -> tuple[int, ...]:
    (key,) = segment.keys
    rows = t5_rows(clip, key, full[key])
    if phrase.startswith(_EMBEDDING):  # by value, when T5 took the vectors at all
        needle = t5_rows(clip, key, clip.tokenize(phrase)[key])
        hits = [i for i in range(len(rows) - len(needle) + 1) if needle
                and all(_same(rows[i + j], needle[j]) for j in range(len(needle)))]
        if not hits or not all(isinstance(t, torch.Tensor) for t in needle):
            return ()
        start = hits[min(occurrence, len(hits) - 1)]
        return tuple(range(start, start + len(needle)))
    text, spans = t5_text(clip, key, rows)
    mentions = mention_spans(text, phrase)
    if not mentions:
        raise _not_in_prompt(role, phrase)
    start, end = mentions[min(occurrence, len(mentions) - 1)]
    found = []
    for i, (a, b) in enumerate(spans):
        a += len(text[a:b]) - len(text[a:b].lstrip())  # the word-start mark is no part of a word
        if a < b and a < end and b > start:
            found.append(i)
    return tuple(found)


def locate_parts(clip, text: str, phrase: str, occurrence: int = 0, role: str = "object") -> dict[str, tuple[int, ...]]:
    """Positions of `phrase` (its `occurrence`-th mention) in the encoded `text`, per part of
    the context: {"clip": rows} and/or {"t5": rows} (context rows, offsets included)."""
    full = clip.tokenize(text)
    layout = text_contexts.context(clip, full)
    parts: dict[str, tuple[int, ...]] = {}
    for segment in layout.segments:
        if segment.kind == "clip":
            rows = _clip_rows(clip, segment, full, phrase, occurrence, role)
        else:
            rows = _t5_rows(clip, segment, full, phrase, occurrence, role)
        if not rows and phrase.startswith(_EMBEDDING):
            if len(layout.segments) > 1:
                continue  # SD3: an embedding for CLIP-L / CLIP-G has its CLIP rows only
            raise RelationError(
                f'{role} "{phrase}": this model reads the prompt through T5, and T5 has no such embedding '
                f"(the context is {text_contexts.describe(layout.encoder)}). Name the object by a word of the prompt.")
        if not rows:
            raise RelationError(f'{role} "{phrase}" has no tokens for this CLIP. Use a word of the prompt.')
        parts[segment.kind] = tuple(segment.offset + r for r in rows)
    return parts


def locate(clip, text: str, phrase: str, occurrence: int = 0, role: str = "object") -> tuple[int, ...]:
    """Positions of the tokens of `phrase` (its `occurrence`-th mention) in the encoded `text`:
    one group, whose maps the capture averages (SD3: the CLIP rows and the T5 rows)."""
    parts = locate_parts(clip, text, phrase, occurrence, role)
    return tuple(r for part in parts.values() for r in part)


def encoder_family(clip) -> str:
    """Which parts of the text encoder make the context: 'clip_l' (SD1), 'clip_h' (SD2),
    'clip_g+clip_l' (SDXL), 't5xxl' (Flux, Chroma), 'clip_g+clip_l+t5xxl' (SD3). RelationError
    for a CLIP whose context InfSplign does not read."""
    return text_contexts.context(clip, clip.tokenize("a")).encoder


def sequence_length(clip, text: str) -> int:
    """Rows of the context CLIPTextEncode builds from `text` with this CLIP."""
    return text_contexts.context(clip, clip.tokenize(text)).length
