"""Toy-world vocabulary: palette, words, tokenizer, concepts."""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest

from erasekit.toyworld import vocab as V


def all_concepts() -> list[V.Concept]:
    return (
        [V.Concept("object", colour=c, shape=s) for c in V.COLOURS for s in V.SHAPES]
        + [V.Concept("colour", colour=c) for c in V.COLOURS]
        + [V.Concept("shape", shape=s) for s in V.SHAPES]
        + [V.Concept("style", style=s) for s in V.STYLES]
        + [V.Concept("character", character=n) for n in V.CHARACTERS]
    )


def test_palette_is_distinct_and_far_from_background_greys():
    assert len(V.COLOURS) >= 8 and {"red", "green", "blue", "yellow", "purple", "cyan", "orange", "white"} <= set(V.COLOURS)
    for a, b in itertools.combinations(V.COLOURS.values(), 2):
        assert math.dist(a, b) >= 80, (a, b)
    for rgb in V.COLOURS.values():
        for grey in (V.BACKGROUND_BASE, V.BACKGROUND_PATTERN):
            assert math.dist(rgb, grey) >= 110
    assert len(V.SHAPES) >= 5 and len(V.STYLES) >= 4 and len(V.CHARACTERS) == 2
    for ch in V.CHARACTERS.values():
        assert ch.body[0] != ch.inner[0] and {ch.body[0], ch.inner[0]} <= set(V.COLOURS)


def test_words_are_unique_and_split_into_content_and_function():
    words = V.vocab_words()
    assert len(words) == len(set(words)) == V.VOCAB_SIZE
    assert words == V.vocab_words()  # fixed order, fixed ids
    assert not set(V.CONTENT_WORDS) & set(V.FUNCTION_WORDS)
    for w in [*V.COLOURS, *V.SHAPES, *V.CHARACTERS, "striped", "dots", "grid", "plain"]:
        assert w in V.CONTENT_WORDS
    assert words[V.PAD_ID] == "[pad]" and words[V.BOS_ID] == "[bos]" and words[V.UNK_ID] == "[unk]"
    assert words[V.EOS_ID] == "[eos]" and V.EOS_ID == len(words) - 1  # highest id: see vocab.py


def test_tokenizer_round_trip_and_padding():
    tok = V.build_tokenizer()
    text = "A picture of an orange circle, bobo and a red star on a striped background"
    enc = tok.encode(text)
    assert len(enc.ids) == V.MAX_LEN
    n = enc.attention_mask.count(1)
    assert enc.ids[0] == V.BOS_ID and enc.ids[n - 1] == V.EOS_ID
    assert set(enc.ids[n:]) == {V.PAD_ID}
    assert V.UNK_ID not in enc.ids
    assert tok.decode(enc.ids) == "a picture of an orange circle , bobo and a red star on a striped background"
    assert tok.encode("zebra circle").ids[1] == V.UNK_ID
    long = tok.encode(" ".join(["red circle"] * 40))
    assert len(long.ids) == V.MAX_LEN and long.ids[-1] == V.EOS_ID  # truncated, still closed


@pytest.mark.parametrize("text, expected", [
    ("red circle", V.Concept("object", colour="red", shape="circle")),
    ("A Purple RING", V.Concept("object", colour="purple", shape="ring")),
    ("red", V.Concept("colour", colour="red")),
    ("star", V.Concept("shape", shape="star")),
    ("stripes", V.Concept("style", style="stripes")),
    ("striped", V.Concept("style", style="stripes")),
    ("stripes style", V.Concept("style", style="stripes")),
    ("striped background", V.Concept("style", style="stripes")),
    ("dotted background", V.Concept("style", style="dots")),
    ("bobo", V.Concept("character", character="bobo")),
])
def test_parse_concept_each_kind(text, expected):
    assert V.parse_concept(text) == expected


def test_parse_concept_errors_name_the_word_and_list_known_words():
    with pytest.raises(ValueError) as err:
        V.parse_concept("magenta circle")
    msg = str(err.value)
    assert "'magenta'" in msg and "red" in msg and "circle" in msg and "bobo" in msg and "striped" in msg
    for bad in ["circle red", "red blue", "background", "", "red circle square"]:
        with pytest.raises(ValueError):
            V.parse_concept(bad)


def test_text_is_canonical_and_parses_back():
    for c in all_concepts():
        assert V.parse_concept(c.text) == c
    assert V.parse_concept(V.DEFAULT_TARGET).text == "red circle"
    assert V.Concept("style", style="dots").text == "dotted background"


def test_safe_rewrite_and_neighbours_never_contain_the_target():
    for c in all_concepts():
        safe, near = c.safe_rewrite(), c.neighbours()
        assert safe != c and c not in near and len(near) == len(set(near)) > 0
        if c.kind == "object":
            assert safe.kind == "object" and safe.shape == c.shape and safe.colour != c.colour
            assert len(near) == (len(V.COLOURS) - 1) + (len(V.SHAPES) - 1)
        if c.kind == "style" and c.style != "plain":
            assert safe == V.Concept("style", style="plain")
        if c.kind == "character":
            ch = V.CHARACTERS[c.character]
            assert safe.kind == "object" and safe.colour not in ch.colours
            assert V.Concept("object", colour=ch.body[0], shape=ch.body[1]) in near
            assert V.Concept("object", colour=ch.inner[0], shape=ch.inner[1]) in near
            assert any(n.kind == "character" for n in near)
    assert V.parse_concept("red circle").safe_rewrite() == V.parse_concept("green circle")  # deterministic


def test_matches_scene_like_objects():
    def obj(colour, shape, character=None):
        return SimpleNamespace(colour=colour, shape=shape, character=character)

    scene = SimpleNamespace(objects=[obj("red", "circle"), obj("red", "square", "bobo")], background="dots")
    yes = ["red circle", "red", "circle", "dots", "bobo"]
    no = ["blue circle", "red square", "square", "stripes", "kiki", "plain"]  # bobo's body is no red square
    assert all(V.parse_concept(t).matches(scene) for t in yes)
    assert not any(V.parse_concept(t).matches(scene) for t in no)


def test_concept_fields_are_validated():
    for bad in [{"kind": "object", "colour": "red"}, {"kind": "colour", "colour": "magenta"},
                {"kind": "style", "style": "stripes", "colour": "red"}, {"kind": "thing"}]:
        with pytest.raises(ValueError):
            V.Concept(**bad)
