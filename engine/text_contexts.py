"""Where each text encoder's tokens sit in the conditioning a model reads.

`clip.tokenize(text)` gives each tokenizer's tokens ({"l": chunks, "g": chunks, "t5xxl": ...});
the text encoder then builds the context (the conditioning's rows) from them in its own way.
A Context says, for one CLIP and one prompt, which tokenizers' tokens become which rows:

- SD1.x / SD2.x / SDXL (and other CLIP-only encoders): CLIP chunks of 77 tokens (start and
  end token in each; Long-CLIP: 248), concatenated along the sequence; SDXL joins CLIP-L and
  CLIP-G on the feature axis, so both give the same rows. Token i of chunk k is row 77 k + i.
- Flux.1 (FluxClipModel): the context is T5 alone, T5 token i at row i (ComfyUI pads T5 to at
  least 256 tokens); CLIP-L gives only the pooled vector, none of the rows.
- Chroma and other T5-only encoders (PixArt's T5): T5 token i at row i (Chroma: no padding).
- SD3 / SD3.5 (SD3ClipModel): CLIP-L and CLIP-G joined on the feature axis (77-token chunks;
  with both, cut to the shorter of the two, and padded to 4096 features), then T5's rows
  appended: T5 token i at row C + i, C = the CLIP rows (77 k). Any part may be missing (a
  checkpoint without T5, a TripleCLIPLoader with all three, ...): only the parts the encoder
  holds make rows.

Read off ComfyUI 0.3.75 and 0.33.0 (comfy/sd1_clip.py, comfy/sdxl_clip.py,
comfy/text_encoders/flux.py, sd3_clip.py, pixart_t5.py), checked in the tests by encoding:
a weighted token changes exactly its own rows. Any other encoder (Wan's UMT5, HunyuanVideo's
Llama, Qwen-Image, Flux.2, HiDream, ...) builds its context differently and is refused with a
RelationError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass

from comfy.text_encoders import flux as flux_te
from comfy.text_encoders import sd3_clip

from ..guidance.relations import RelationError

CLIP_KEYS = ("g", "h", "l")  # clip.tokenize() keys of CLIP tokenizers
T5 = "t5xxl"

# Encoder names (SpatialRelations.encoder) and the models whose prompts they encode.
ENCODER_MODELS = {
    "clip_l": "SD1.x", "clip_h": "SD2.x", "clip_g+clip_l": "SDXL (or SD3 without T5)",
    "clip_g+clip_l+t5xxl": "SD3 / SD3.5", "clip_g+t5xxl": "SD3 / SD3.5 without CLIP-L",
    "clip_l+t5xxl": "SD3 / SD3.5 without CLIP-G", "t5xxl": "Flux.1, Chroma (or SD3 with T5 only)",
}
SUPPORTED = ("the CLIP of SD1.x (clip_l), SD2.x (clip_h), SDXL (clip_g + clip_l), SD3 / SD3.5 "
             "(clip_l, clip_g, t5xxl), Flux.1 (clip_l + t5xxl: the prompt is read from T5) or Chroma (t5xxl)")


@dataclass(frozen=True)
class Segment:
    """Rows of the context that one kind of tokenizer fills."""

    keys: tuple[str, ...]  # clip.tokenize() keys whose encodings share these rows (feature-axis join)
    kind: str  # "clip": 77-token chunks with start and end tokens; "t5": one sequence, no start token
    offset: int  # the context row of the segment's first token
    length: int  # rows

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(T5 if k == T5 else f"clip_{k}" for k in self.keys)


@dataclass(frozen=True)
class Context:
    segments: tuple[Segment, ...]

    @property
    def encoder(self) -> str:
        """'clip_l', 'clip_h', 'clip_g+clip_l' (UNets), 't5xxl' (Flux, Chroma),
        'clip_g+clip_l+t5xxl' (SD3; without a missing part): the parts the rows come from."""
        return "+".join(sorted(n for s in self.segments for n in s.names))

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)


def sub_tokenizer(clip, key: str):
    """The tokenizer object behind one key of clip.tokenize(): `clip_l`, `clip_g`, ... on every
    CLIP; T5's is `t5xxl` on Flux's and SD3's tokenizer, `clip_t5xxl` on PixArt's (Chroma)."""
    tok = clip.tokenizer
    names = (T5, f"clip_{T5}") if key == T5 else (f"clip_{key}",)
    for name in names:
        sub = getattr(tok, name, None)
        if sub is not None:
            return sub
    raise RelationError(_unsupported(clip, [key]))


def _rows(chunks) -> int:
    return sum(len(c) for c in chunks)


def _is_clip(sub) -> bool:
    """A CLIP tokenizer: chunks with a start and an end token (77 tokens; Long-CLIP: 248)."""
    return getattr(sub, "start_token", None) is not None and getattr(sub, "end_token", None) is not None


def _is_t5(encoder) -> bool:
    return isinstance(encoder, sd3_clip.T5XXLModel)


def _unsupported(clip, keys) -> str:
    encoder = type(getattr(clip, "cond_stage_model", None)).__name__
    tokenizer = type(getattr(clip, "tokenizer", None)).__name__
    return (f"Spatial Relation Parse cannot find words in the context of this CLIP: its text encoder is "
            f"{encoder} (tokenizer {tokenizer}: {', '.join(sorted(keys)) or 'no tokens'}), which builds the "
            f"conditioning in a way InfSplign does not read. Supported: {SUPPORTED}. Connect the CLIP that "
            "encodes the positive prompt of a supported model.")


def context(clip, tokens: dict) -> Context:
    """The context layout of `clip` for one tokenized prompt (`tokens` = clip.tokenize(text))."""
    keys = set(tokens)
    encoder = getattr(clip, "cond_stage_model", None)
    if keys and keys <= set(CLIP_KEYS) and all(_is_clip(sub_tokenizer(clip, k)) for k in keys):
        # SD1.x, SD2.x, SDXL (and its refiner): one CLIP segment, all keys on the same rows
        return Context((Segment(tuple(sorted(keys)), "clip", 0, max(_rows(tokens[k]) for k in keys)),))
    if keys == {"l", T5} and isinstance(encoder, flux_te.FluxClipModel):
        return Context((Segment((T5,), "t5", 0, _rows(tokens[T5])),))
    if keys == {"g", "l", T5} and isinstance(encoder, sd3_clip.SD3ClipModel):
        return _sd3(clip, encoder, tokens)
    if keys == {T5} and _is_t5(getattr(encoder, T5, None)):  # Chroma, PixArt
        return Context((Segment((T5,), "t5", 0, _rows(tokens[T5])),))
    raise RelationError(_unsupported(clip, keys))


def _sd3(clip, encoder, tokens: dict) -> Context:
    clip_keys = tuple(k for k in ("g", "l") if getattr(encoder, f"clip_{k}", None) is not None)
    segments = []
    if clip_keys:
        if not all(_is_clip(sub_tokenizer(clip, k)) for k in clip_keys):
            raise RelationError(_unsupported(clip, tokens))
        # SD3ClipModel cuts CLIP-L and CLIP-G to the shorter of the two before joining them
        segments.append(Segment(clip_keys, "clip", 0, min(_rows(tokens[k]) for k in clip_keys)))
    if getattr(encoder, T5, None) is not None:
        offset = segments[0].length if segments else 0
        segments.append(Segment((T5,), "t5", offset, _rows(tokens[T5])))
    if not segments:  # ComfyUI encodes zeros then; no word has a row
        raise RelationError("This SD3 CLIP holds none of CLIP-L, CLIP-G and T5: its conditioning has no "
                            "words. Load the text encoders of the checkpoint.")
    return Context(tuple(segments))


def describe(encoder: str) -> str:
    """'t5xxl (Flux.1, Chroma (or SD3 with T5 only))' for an encoder name, for messages."""
    models = ENCODER_MODELS.get(encoder)
    return f"{encoder} ({models})" if models else encoder
