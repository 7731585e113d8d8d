"""Reading spatial relations <A, R, B> out of a prompt.

"a potted plant to the right of a clock" -> Relation("potted plant", "right", "clock").
Plain text in, plain data out: token positions are found elsewhere (engine/tokens.py),
with the tokenizer of the CLIP that encodes the prompt.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .box_geometry import apart_boxes, placed_by_burst
from .boxes import BoundBox, LayoutSettings

# Canonical relation -> accepted phrasings (ALGORITHM.md section 1; "near" as in T2I-CompBench).
PHRASINGS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "on the left of", "left of"),
    "right": ("to the right of", "on the right of", "right of"),
    "above": ("on the top of", "on top of", "above", "over"),
    "below": ("on the bottom of", "underneath", "beneath", "below", "under"),
    "near": ("on the side of", "next to", "beside", "near"),
}
# Depth relations: a 2D centroid cannot express them, so they are refused, never guessed.
DEPTH_PHRASINGS = ("in front of", "behind")
RELATIONS = tuple(PHRASINGS)

# Words that end an object phrase (reading away from the relation phrase).
_STOP = frozenset("""
a an the this that these those some one two three its their his her my your our
and or but with without while where which who of in on at into onto from by for to
is are was were be being sits sitting stands standing lies lying placed located
there here photo picture image painting drawing rendering
""".split())
# Linking words skipped between an object and its relation: "a cat is sitting left of a dog".
_LINK = frozenset("""
is are was were be being sits sitting sit stands standing stand lies lying lie placed
located positioned put set just directly slightly far
""".split())
_MAX_OBJECT_WORDS = 3
_MAX_TEXT = 20_000  # characters read; a longer prompt is refused with a clear message
_MAX_RELATIONS = 32  # relations in one prompt; more is refused (and would cost quadratic time)

_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d*)?\s*(?=\))")  # the ":1.3" of "(red car:1.3)"
_BRACKETS = re.compile(r"(?<!\\)[()\[\]]")
_WORD = re.compile(r"embedding:[\w.\-/]*[\w\-/]|[^\W_](?:[\w'-]*[^\W_])?", re.UNICODE)
# Clause boundaries; the colon of "embedding:name" and the dot inside "embedding:my.v2" are not.
_BOUNDARY = re.compile(r"[,;!?\n]|(?<!embedding):|\.(?![\w-])")


class RelationError(ValueError):
    """A prompt or override that cannot be read as spatial relations; the message says why."""


@dataclass(frozen=True)
class Relation:
    """A sits `relation` of B, e.g. ("cat", "left", "dog"): the cat is left of the dog."""

    object_a: str
    relation: str
    object_b: str
    # index of this mention among equal mentions in the prompt (repeated words), 0-based
    occurrence_a: int = 0
    occurrence_b: int = 0


def accepted_phrasings() -> str:
    """The accepted phrasings, for error messages and help texts."""
    return "; ".join(f"{r}: " + ", ".join(f'"{p}"' for p in ps) for r, ps in PHRASINGS.items())


def strip_weight_syntax(text: str) -> str:
    """'(red car:1.3) and [dog]' -> 'red car and dog' (ComfyUI's emphasis syntax removed)."""
    return _BRACKETS.sub(" ", _WEIGHT.sub("", text)).replace("\\(", "(").replace("\\)", ")")


def _alternatives(phrases) -> str:
    return "|".join(r"\s+".join(map(re.escape, p.split())) for p in sorted(phrases, key=len, reverse=True))


def _phrase_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-])(?:{_alternatives(phrases)})(?![\w-])", re.IGNORECASE)


def _relation_pattern() -> re.Pattern[str]:
    """Every phrasing, longest first, in a named group per relation: the match says which
    relation it is (m.lastgroup), however its letters are cased. (Case-insensitive
    matching accepts letters whose lower() is not the phrasing's, e.g. "ſ" for "s", so the
    matched text itself is no key to look the relation up by.)"""
    order = sorted(((p, r) for r, ps in PHRASINGS.items() for p in ps), key=lambda pr: len(pr[0]), reverse=True)
    body = "|".join(rf"(?P<{r}_{i}>{_alternatives([p])})" for i, (p, r) in enumerate(order))
    return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE)


_RELATION_RE = _relation_pattern()
_DEPTH_RE = _phrase_pattern(DEPTH_PHRASINGS)
_CANONICAL = {" ".join(p.split()): r for r, ps in PHRASINGS.items() for p in ps}


def _words(segment: str) -> list[str]:
    return _WORD.findall(segment)


def _object_before(segment: str) -> str:
    """The object phrase that ends a text segment: 'a photo of a red cat' -> 'red cat'."""
    segment = _BOUNDARY.split(segment)[-1]
    words = _words(segment)
    while words and words[-1].lower() in _LINK:
        words.pop()
    kept: list[str] = []
    for w in reversed(words):
        if w.lower() in _STOP or len(kept) == _MAX_OBJECT_WORDS:
            break
        kept.append(w)
    return " ".join(reversed(kept))


def _object_after(segment: str) -> str:
    """The object phrase that starts a text segment: 'a big dog and a car' -> 'big dog'."""
    segment = _BOUNDARY.split(segment)[0]
    words = _words(segment)
    i = 0
    while i < len(words) and words[i].lower() in _STOP and words[i].lower() not in ("and", "or", "with"):
        i += 1
    kept: list[str] = []
    for w in words[i:]:
        if w.lower() in _STOP or len(kept) == _MAX_OBJECT_WORDS:
            break
        kept.append(w)
    return " ".join(kept)


def _joined_to_previous(segment: str) -> bool:
    """True when a segment is only a conjunction: '... a dog and above a car' shares A."""
    words = [w.lower() for w in _words(_BOUNDARY.split(segment)[-1])]
    return not words or words[-1] in ("and", "but", "while", "also")


def count_mentions(text: str, phrase: str, end: int | None = None) -> int:
    """How often `phrase` occurs as whole words in text[:end] (case-insensitive)."""
    return len(re.findall(_mention_pattern(phrase), text[:end], re.IGNORECASE))


def mention_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """(start, end) of each whole-word mention of `phrase` in `text`, in order, by the rule
    count_mentions counts them (case-insensitive, any whitespace between its words)."""
    return [m.span() for m in re.finditer(_mention_pattern(phrase), text, re.IGNORECASE)]


def parse_relations(text: str) -> list[Relation]:
    """Every <A, R, B> in a prompt, in reading order. Raises RelationError when none is found.

    Weight syntax is ignored; "A left of B and above C" gives (A left B), (A above C).
    """
    if len(text) > _MAX_TEXT:
        raise RelationError(
            f"The prompt has {len(text)} characters; Spatial Relation Parse reads at most "
            f"{_MAX_TEXT}. Shorten the text, or set object_a, relation and object_b.")
    clean = strip_weight_syntax(text)
    depth = _DEPTH_RE.search(clean)
    if depth:
        raise RelationError(
            f'"{depth.group(0)}" is a depth relation: InfSplign moves objects in the image '
            f"plane and cannot express it. Use one of: {', '.join(RELATIONS)}.")
    matches = list(_RELATION_RE.finditer(clean))
    mentions = _Mentions(clean)
    relations: list[Relation] = []
    previous_end = 0
    for k, m in enumerate(matches):
        next_start = matches[k + 1].start() if k + 1 < len(matches) else len(clean)
        before = clean[previous_end:m.start()]
        a = _object_before(before)
        a_end = m.start()
        if not a and relations and _joined_to_previous(before):
            a = relations[-1].object_a
            a_end = mentions.end_of(a, relations[-1].occurrence_a)
        b = _object_after(clean[m.end():next_start])
        previous_end = m.end()
        if not a or not b:
            continue
        canonical = m.lastgroup.rsplit("_", 1)[0]
        relations.append(Relation(
            a, canonical, b,
            # 0 when the words of A are not written next to each other ("1e+16 embedding")
            occurrence_a=max(mentions.count(a, a_end) - 1, 0),
            occurrence_b=mentions.count(b, m.end())))
        if len(relations) > _MAX_RELATIONS:
            raise RelationError(
                f"The prompt holds more than {_MAX_RELATIONS} spatial relations; Spatial Relation Parse "
                f"reads at most {_MAX_RELATIONS}. Keep the relations that matter in the text, or set "
                "object_a, relation and object_b on the node.")
    if not relations:
        shown = clean if len(clean) <= 120 else clean[:117] + "..."
        raise RelationError(
            f'No spatial relation found in "{shown}". Write it as "A <relation> B", for example '
            f'"a cat to the left of a dog". Accepted phrasings: {accepted_phrasings()}. '
            "Or set object_a, relation and object_b on the node.")
    return relations


class _Mentions:
    """count_mentions for many phrases of one text, each phrase searched once (a prompt of
    many relations stays linear in their number, not quadratic)."""

    def __init__(self, text: str):
        self.text, self._ends = text, {}

    def _all(self, phrase: str) -> list[int]:
        if phrase not in self._ends:
            self._ends[phrase] = [m.end() for m in re.finditer(_mention_pattern(phrase), self.text, re.IGNORECASE)]
        return self._ends[phrase]

    def count(self, phrase: str, end: int) -> int:
        """Mentions of `phrase` that end at or before `end` (as count_mentions(text, phrase, end)
        where text[end] cannot continue a word, which holds at every call site)."""
        return bisect.bisect_right(self._all(phrase), end)

    def end_of(self, phrase: str, occurrence: int) -> int:
        ends = self._all(phrase)
        return ends[occurrence] if occurrence < len(ends) else len(self.text)


def _mention_pattern(phrase: str) -> str:
    return r"(?<![\w-])" + r"\s+".join(map(re.escape, phrase.split())) + r"(?![\w-])"


def canonical_relation(name: str) -> str:
    """'left of' / 'Left' / 'to the left of' -> 'left'; RelationError names the accepted ones."""
    key = " ".join(name.lower().split())
    if key in PHRASINGS:
        return key
    if key in _CANONICAL:
        return _CANONICAL[key]
    if key in DEPTH_PHRASINGS:
        raise RelationError(f'"{name}" is a depth relation and cannot be guided in 2D. '
                            f"Use one of: {', '.join(RELATIONS)}.")
    raise RelationError(f'Unknown relation "{name}". Use one of: {", ".join(RELATIONS)} '
                        f"(or a phrasing: {accepted_phrasings()}).")


@dataclass(frozen=True)
class BoundRelation:
    """A relation with its objects' positions in the encoded prompt (the conditioning's
    sequence axis: chunk * 77 + index for prompts longer than one chunk)."""

    relation: Relation
    tokens_a: tuple[int, ...]
    tokens_b: tuple[int, ...]


@dataclass(frozen=True)
class BoundObject:
    """An object named in Spatial Relation Parse's `objects` list, with its token positions."""

    object: str
    tokens: tuple[int, ...]


_MAX_OBJECTS = 16


def split_objects(text: str) -> list[str]:
    """'red circle, blue square and green triangle' -> the object phrases, in order.

    Commas (or semicolons) separate phrases; a leading "a", "an", "the" or "and" and a
    trailing "and" or "or" are dropped. RelationError for a list with an empty item, a repeated phrase, or more than
    16 phrases."""
    phrases = []
    for part in re.split(r"[,;\n]", text):
        words = part.split()
        while words and words[0].lower() in ("a", "an", "the", "and", "one"):
            words.pop(0)
        while words and words[-1].lower() in ("and", "or"):
            words.pop()
        if not words:
            raise RelationError(f'objects "{text.strip()}": an item is empty. Write object phrases of the '
                                'prompt separated by commas, e.g. "red circle, blue square, green triangle".')
        phrases.append(" ".join(words))
    if len(phrases) > _MAX_OBJECTS:
        raise RelationError(f"objects lists {len(phrases)} phrases; at most {_MAX_OBJECTS} are read. "
                            "Keep the objects that matter.")
    seen = set()
    for phrase in phrases:
        if phrase.lower() in seen:
            raise RelationError(f'objects names "{phrase}" twice; name each object once.')
        seen.add(phrase.lower())
    return phrases


@dataclass(frozen=True)
class SpatialRelations:
    """What Spatial Relation Parse (and InfSplign Layout Boxes) hands to the capture and
    guidance nodes: relations, and optionally boxes with their settings."""

    items: tuple[BoundRelation, ...]
    text: str
    encoder: str  # tokenizer family, e.g. "clip_l", "clip_h", "clip_g+clip_l"
    sequence_length: int  # tokens in the encoded prompt
    boxes: tuple[BoundBox, ...] = ()
    layout: LayoutSettings = LayoutSettings()
    objects: tuple[BoundObject, ...] = ()  # Spatial Relation Parse's `objects` list

    def summary(self) -> str:
        lines = []
        for i, b in enumerate(self.items, 1):
            r = b.relation
            verb = f"{r.relation} of" if r.relation in ("left", "right") else r.relation
            lines.append(f'{i}. "{r.object_a}" {verb} "{r.object_b}"  '
                         f"(tokens {r.object_a}: {list(b.tokens_a)}, {r.object_b}: {list(b.tokens_b)})")
        for b in self.boxes:
            x0, y0, x1, y1 = (round(v, 3) for v in b.box.corners)
            lines.append(f'box "{b.box.object}": [{x0}, {y0}, {x1}, {y1}] (tokens {list(b.tokens)})')
        if self.boxes:
            s = self.layout
            lines.append(f"injection {s.injection:g} until {s.injection_end_percent:g}, box loss {s.box_loss} "
                         f"weight {s.box_weight:g} until {s.box_end_percent:g}, margin {s.box_margin:g}")
            drawn = tuple(b.box for b in self.boxes)
            if s.places:
                placed = placed_by_burst(drawn)
                lines.append(f"placing: {s.placing_iterations} Adam steps on the box loss at "
                             f"{s.placing_percent:g} of the schedule"
                             + ("" if len(placed) == len(drawn) else
                                ", leaving out " + ", ".join(f'"{b.object}"' for i, b in enumerate(drawn)
                                                             if i not in placed) + " (boxes overlapping much)"))
            for box, read in zip(drawn, apart_boxes(drawn, s.box_margin)):
                if read != box:
                    x0, y0, x1, y1 = (round(v, 3) for v in read.corners)
                    lines.append(f'  the box loss reads "{box.object}" as [{x0}, {y0}, {x1}, {y1}] '
                                 "(near or over another box)")
        if self.objects:
            lines.append("objects: " + ", ".join(f'"{o.object}" {list(o.tokens)}' for o in self.objects))
        lines.append(f"encoder {self.encoder}, {self.sequence_length} tokens")
        return "\n".join(lines)
