"""Vocabulary of the toy world: what can appear in a scene, the words of its captions, and concepts.

Pure Python (no numpy, no torch), so anything may import it cheaply.

A *concept* is what a user asks to erase: an object ("red circle"), a colour ("red"), a shape
("circle"), a background style ("striped background") or a character ("bobo"). Characters are
distinct units: a plain-object concept such as "red square" never matches the red body of "bobo".
"""
from __future__ import annotations

from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# What a scene is made of
# ----------------------------------------------------------------------------------------------

# Far apart in RGB (closest pair, orange/yellow, is ~86 apart) and all bright, so that an
# antialiased edge (a mix with the dark background) stays on its own colour's line segment.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 225, 40),
    "purple": (165, 60, 215),
    "cyan": (40, 215, 225),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")

# Background styles play the part of an artistic style. Drawn in two dim greys that no palette
# colour (nor a palette colour's antialiased edge) can be mistaken for.
STYLES: tuple[str, ...] = ("plain", "stripes", "dots", "grid")
BACKGROUND_BASE: tuple[int, int, int] = (20, 20, 20)
BACKGROUND_PATTERN: tuple[int, int, int] = (75, 75, 75)

# Caption words for a style: the noun form ("dots background") and adjective form ("on a dotted
# background"). STYLE_WORDS maps every accepted word back to the style.
STYLE_NOUNS = {"plain": "plain", "stripes": "stripes", "dots": "dots", "grid": "grid"}
STYLE_ADJECTIVES = {"plain": "plain", "stripes": "striped", "dots": "dotted", "grid": "grid"}
STYLE_WORDS = {**{w: s for s, w in STYLE_NOUNS.items()}, **{w: s for s, w in STYLE_ADJECTIVES.items()}}


@dataclass(frozen=True)
class Character:
    """A named composite figure, always drawn with the same colours: `inner` sits centred on
    `body`, with radius `inner_scale` times the body's."""

    name: str
    body: tuple[str, str]  # (colour, shape)
    inner: tuple[str, str]  # (colour, shape)
    inner_scale: float = 0.5

    @property
    def colours(self) -> tuple[str, str]:
        return (self.body[0], self.inner[0])


CHARACTERS: dict[str, Character] = {
    "bobo": Character("bobo", body=("red", "square"), inner=("white", "circle")),
    "kiki": Character("kiki", body=("blue", "circle"), inner=("yellow", "star")),
}


def object_label(colour: str, shape: str, character: str | None = None) -> str:
    """The label used to compare scenes with judgements: "red circle", or the character's name."""
    return character if character else f"{colour} {shape}"


# ----------------------------------------------------------------------------------------------
# Words and tokenizer
# ----------------------------------------------------------------------------------------------

MAX_LEN = 24  # tokens per caption incl. [bos]/[eos]; the longest caption needs 20

FUNCTION_WORDS: tuple[str, ...] = (
    "a", "an", "and", "on", "with", "of", "picture", "background", "style", ",",
)
CONTENT_WORDS: tuple[str, ...] = (
    *COLOURS, *SHAPES, *dict.fromkeys([*STYLE_NOUNS.values(), *STYLE_ADJECTIVES.values()]), *CHARACTERS,
)

# [eos] gets the highest id on purpose: transformers' CLIPTextModel pools the text embedding at
# argmax(input_ids) when its config says eos_token_id == 2 (legacy path), and at the first
# input_ids == eos_token_id otherwise. With [eos] last, both paths find it.
PAD, BOS, UNK, EOS = "[pad]", "[bos]", "[unk]", "[eos]"


def vocab_words() -> list[str]:
    """All tokens in id order (deterministic): [pad] [bos] [unk], function words, content words, [eos]."""
    return [PAD, BOS, UNK, *FUNCTION_WORDS, *CONTENT_WORDS, EOS]


PAD_ID, BOS_ID, UNK_ID = 0, 1, 2
EOS_ID = len(vocab_words()) - 1
VOCAB_SIZE = len(vocab_words())


def build_tokenizer(max_len: int = MAX_LEN):
    """A `tokenizers.Tokenizer` for captions: lower-cases, splits words and punctuation,
    wraps in [bos] ... [eos], pads / truncates to `max_len` ids (pad id 0)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(vocab_words())}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
    )
    tok.add_special_tokens([PAD, BOS, UNK, EOS])
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=max_len)
    return tok


# ----------------------------------------------------------------------------------------------
# Concepts
# ----------------------------------------------------------------------------------------------

KINDS = ("object", "colour", "shape", "style", "character")
DEFAULT_TARGET = "red circle"


def _next(options, current, skip=()) -> str:
    """The option after `current` in a fixed cyclic order, skipping `skip` (deterministic choice)."""
    options = list(options)
    i = options.index(current)
    for k in range(1, len(options) + 1):
        cand = options[(i + k) % len(options)]
        if cand != current and cand not in skip:
            return cand
    raise ValueError(f"no alternative to {current!r}")


@dataclass(frozen=True)
class Concept:
    """Something to erase or preserve. Exactly the fields of its `kind` are set:
    object: colour+shape; colour: colour; shape: shape; style: style; character: character."""

    kind: str
    colour: str | None = None
    shape: str | None = None
    style: str | None = None
    character: str | None = None

    def __post_init__(self):
        fields = {"object": ("colour", "shape"), "colour": ("colour",), "shape": ("shape",),
                  "style": ("style",), "character": ("character",)}.get(self.kind)
        if fields is None:
            raise ValueError(f"unknown concept kind {self.kind!r}; known: {list(KINDS)}")
        known = {"colour": COLOURS, "shape": SHAPES, "style": STYLES, "character": CHARACTERS}
        for name, values in known.items():
            value = getattr(self, name)
            if (name in fields) != (value is not None) or (value is not None and value not in values):
                raise ValueError(f"bad {name}={value!r} for a {self.kind} concept (needs {fields})")

    @property
    def text(self) -> str:
        """Canonical phrase, in the words the captions use (so it can be fed to the text encoder)."""
        if self.kind == "object":
            return f"{self.colour} {self.shape}"
        if self.kind == "style":
            return f"{STYLE_ADJECTIVES[self.style]} background"
        return {"colour": self.colour, "shape": self.shape, "character": self.character}[self.kind]

    def __str__(self) -> str:
        return self.text

    def matches(self, scene_or_judgement) -> bool:
        """Does a `Scene` or `Judgement` (anything with `.objects` and `.background`) contain this?
        Plain-object concepts (object / colour / shape) only look at non-character objects."""
        if self.kind == "style":
            return scene_or_judgement.background == self.style
        for obj in scene_or_judgement.objects:
            if self.kind == "character":
                if obj.character == self.character:
                    return True
            elif obj.character is None:
                if self.colour not in (None, obj.colour) or self.shape not in (None, obj.shape):
                    continue
                return True
        return False

    def safe_rewrite(self) -> Concept:
        """The harmless counterpart a target is steered to (like "nude" -> "dressed" in the papers)."""
        if self.kind == "object":  # same shape, another colour
            return Concept("object", colour=_next(COLOURS, self.colour), shape=self.shape)
        if self.kind == "colour":
            return Concept("colour", colour=_next(COLOURS, self.colour))
        if self.kind == "shape":
            return Concept("shape", shape=_next(SHAPES, self.shape))
        if self.kind == "style":  # "plain" itself has no plainer version: take the next style
            return Concept("style", style="plain" if self.style != "plain" else _next(STYLES, "plain"))
        ch = CHARACTERS[self.character]  # the body's shape in a colour the character does not use
        return Concept("object", colour=_next(COLOURS, ch.body[0], skip=ch.colours), shape=ch.body[1])

    def neighbours(self) -> list[Concept]:
        """Nearby concepts that erasing this one must leave intact (never contains `self`)."""
        if self.kind == "object":
            return [Concept("object", colour=c, shape=self.shape) for c in COLOURS if c != self.colour] + [
                Concept("object", colour=self.colour, shape=s) for s in SHAPES if s != self.shape
            ]
        if self.kind == "colour":
            return [Concept("colour", colour=c) for c in COLOURS if c != self.colour]
        if self.kind == "shape":
            return [Concept("shape", shape=s) for s in SHAPES if s != self.shape]
        if self.kind == "style":
            return [Concept("style", style=s) for s in STYLES if s != self.style]
        ch = CHARACTERS[self.character]
        return [Concept("character", character=n) for n in CHARACTERS if n != ch.name] + [
            Concept("object", colour=c, shape=s) for c, s in (ch.body, ch.inner)
        ]


_IGNORED = {"a", "an", "the"}
_SUFFIXES = {"style", "background"}


def _known_words() -> str:
    return (
        f"colours {list(COLOURS)}, shapes {list(SHAPES)}, styles {list(STYLE_WORDS)} "
        f"(optionally followed by 'style' or 'background'), characters {list(CHARACTERS)}"
    )


def parse_concept(text: str | Concept) -> Concept:
    """Parse "red circle", "red", "circle", "stripes" / "striped background", "bobo" into a Concept.

    Raises ValueError naming the unknown word (and listing the known ones) or the bad combination.
    """
    if isinstance(text, Concept):
        return text
    words = [w for w in text.lower().replace(",", " ").split() if w not in _IGNORED]
    if not words:
        raise ValueError(f"empty concept {text!r}; known words: {_known_words()}")
    for w in words:
        if w not in COLOURS and w not in SHAPES and w not in STYLE_WORDS and w not in CHARACTERS \
                and w not in _SUFFIXES:
            raise ValueError(f"unknown word {w!r} in concept {text!r}; known words: {_known_words()}")

    if len(words) == 2 and words[0] in STYLE_WORDS and words[1] in _SUFFIXES:
        words = words[:1]  # "stripes style", "striped background"
    if len(words) == 1:
        (w,) = words
        if w in COLOURS:
            return Concept("colour", colour=w)
        if w in SHAPES:
            return Concept("shape", shape=w)
        if w in STYLE_WORDS:
            return Concept("style", style=STYLE_WORDS[w])
        if w in CHARACTERS:
            return Concept("character", character=w)
    if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES:
        return Concept("object", colour=words[0], shape=words[1])
    raise ValueError(
        f"cannot parse concept {text!r}: expected 'COLOUR SHAPE' (e.g. 'red circle'), 'COLOUR', "
        f"'SHAPE', 'STYLE [style|background]' or 'CHARACTER'; known words: {_known_words()}"
    )
