"""Captions -> lexemes (spaCy noun chunks) with character and BPE token spans, and `tokens`.

A lexeme is a noun chunk without leading determiners, possessives or symbols, keyed by the
lemma of its root; pronoun chunks are skipped. Token spans index the open_clip tokenizer's
output (position 0 is the start token), so `tokens[tok_start:tok_end]` are the lexeme's BPE tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import pyarrow as pa
import spacy
from spacy.tokens import Doc, Token

from harmoclip.model import register_tiny_configs

LEXEME_TYPE = pa.struct([
    ("text", pa.string()), ("lemma", pa.string()), ("phrase_lemma", pa.string()),
    ("char_start", pa.int32()), ("char_end", pa.int32()), ("tok_start", pa.int32()), ("tok_end", pa.int32()),
])
_LEADING_NOISE_DEPS = {"det", "predet", "poss", "cc", "punct"}


def _is_leading_noise(token: Token) -> bool:
    return (token.dep_ in _LEADING_NOISE_DEPS or token.pos_ in ("DET", "PUNCT", "SYM", "CCONJ")
            or not any(ch.isalnum() for ch in token.text))


def chunk_spans(doc: Doc) -> list[tuple[int, int]]:
    """Token index ranges of the lexemes of a parsed caption."""
    spans = []
    for chunk in doc.noun_chunks:
        if chunk.root.pos_ == "PRON" or not any(ch.isalpha() for ch in chunk.root.text):
            continue
        start = chunk.start
        while start < chunk.root.i and _is_leading_noise(doc[start]):
            start += 1
        spans.append((start, chunk.end))
    return spans


@dataclass(frozen=True)
class Lexeme:
    text: str
    lemma: str
    phrase_lemma: str
    char_start: int
    char_end: int


def extract_lexemes(doc: Doc) -> list[Lexeme]:
    lexemes = []
    for start, end in chunk_spans(doc):
        span = doc[start:end]
        words = [t.lemma_.lower() for t in span if not (t.is_punct or t.is_space)]
        lexemes.append(Lexeme(span.text, span.root.lemma_.lower(), " ".join(words), span.start_char, span.end_char))
    return lexemes


class LexemeParser:
    """Ray Data actor: loads spaCy and the tokenizer once, then parses batches of caption rows."""

    def __init__(self, spacy_pipeline: str, tokenizer_name: str) -> None:
        try:
            self.nlp = spacy.load(spacy_pipeline, disable=["ner"])
        except OSError as err:
            raise OSError(f"spaCy pipeline {spacy_pipeline!r} is not installed: {err}") from err
        register_tiny_configs()
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
        if not hasattr(self.tokenizer, "encode"):
            raise ValueError(f"tokenizer of {tokenizer_name!r} has no BPE encode(); token spans need one")
        self.context_length = self.tokenizer.context_length

    def _pieces(self, caption: str) -> list[tuple[int, int, list[int]]] | None:
        """BPE ids of each regex word piece with its character range, from ONE cleaning pass.

        Exact only when open_clip's cleaning leaves the caption unchanged but for case (true of
        ordinary captions); otherwise None and the caller falls back to encoding prefixes.
        """
        tokenizer = self.tokenizer
        cleaned = tokenizer.clean_fn(caption)
        if cleaned != caption.lower() or len(cleaned) != len(caption):
            return None
        pieces = []
        for match in tokenizer.pat.finditer(cleaned):
            token = "".join(tokenizer.byte_encoder[b] for b in match.group().encode("utf-8"))
            pieces.append((match.start(), match.end(), [tokenizer.encoder[t] for t in tokenizer.bpe(token).split(" ")]))
        return pieces

    def token_position(self, caption: str, char_offset: int, pieces: list | None) -> int:
        """Index in `tokens` of the first BPE token at or after `char_offset` (a word boundary)."""
        if pieces is not None and not any(start < char_offset < end for start, end, _ in pieces):
            return 1 + sum(len(ids) for _, end, ids in pieces if end <= char_offset)
        return 1 + len(self.tokenizer.encode(caption[:char_offset]))

    def tokens(self, caption: str, pieces: list | None) -> list[int]:
        """The tokenizer's output for the caption (start, BPE ids, end, truncated, zero-padded)."""
        if pieces is None:
            return self.tokenizer([caption])[0].tolist()
        ids = [self.tokenizer.sot_token_id] + [i for _, _, piece in pieces for i in piece] + [self.tokenizer.eot_token_id]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length - 1] + [self.tokenizer.eot_token_id]
        return ids + [0] * (self.context_length - len(ids))

    def lexeme_rows(self, caption: str, doc: Doc, pieces: list | None = None) -> tuple[list[dict], int]:
        """(lexemes that fit the context, number truncated away)."""
        rows, truncated = [], 0
        for lexeme in extract_lexemes(doc):
            tok_start = self.token_position(caption, lexeme.char_start, pieces)
            tok_end = self.token_position(caption, lexeme.char_end, pieces)
            if tok_end > self.context_length - 1 or tok_end <= tok_start:
                truncated += 1
                continue
            rows.append({**lexeme.__dict__, "tok_start": tok_start, "tok_end": tok_end})
        return rows, truncated

    def __call__(self, batch: pa.Table) -> pa.Table:
        captions = batch["caption"].to_pylist()
        live = [i for i, reason in enumerate(batch["reject_reason"].to_pylist()) if reason is None]
        tokens: list = [None] * len(captions)
        lexemes: list = [None] * len(captions)
        truncated = [0] * len(captions)
        docs = self.nlp.pipe([captions[i] for i in live], batch_size=256)
        for i, doc in zip(live, docs):
            pieces = self._pieces(captions[i])
            lexemes[i], truncated[i] = self.lexeme_rows(captions[i], doc, pieces)
            tokens[i] = self.tokens(captions[i], pieces)
        return (batch.append_column("tokens", pa.array(tokens, pa.list_(pa.int32())))
                .append_column("lexemes", pa.array(lexemes, pa.list_(LEXEME_TYPE)))
                .append_column("lexemes_truncated", pa.array(truncated, pa.int32())))
