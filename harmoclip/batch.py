"""The batch dict the model consumes, and a seeded synthetic one for smoke runs and benchmarks.

A batch holds fixed-size slots with masks: K region slots and L lexeme slots per sample.
"""

from __future__ import annotations

import hashlib

import open_clip
import torch

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")


def stable_key(text: str) -> int:
    """A signed 64-bit id of a lexeme key, equal on every worker and in every run (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def synthetic_batch(
    model_name: str,
    image_size: tuple[int, int],
    batch_size: int = 32,
    max_regions: int = 20,
    max_lexemes: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random images with random boxes, captions naming up to `max_lexemes` coloured shapes.

    Token spans are built word by word with the model's own tokenizer, so they are exact.
    """
    generator = torch.Generator().manual_seed(seed)
    tokenizer = open_clip.get_tokenizer(model_name)
    context = tokenizer.context_length

    def randint(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    tokens = torch.zeros(batch_size, context, dtype=torch.long)
    spans = torch.zeros(batch_size, max_lexemes, 2, dtype=torch.long)
    lexeme_mask = torch.zeros(batch_size, max_lexemes, dtype=torch.bool)
    keys = torch.zeros(batch_size, max_lexemes, dtype=torch.long)
    for row in range(batch_size):
        ids = [tokenizer.sot_token_id]
        for slot in range(1 + randint(max_lexemes)):
            color, shape = COLORS[randint(len(COLORS))], SHAPES[randint(len(SHAPES))]
            ids += tokenizer.encode("and" if slot else "a")
            start = len(ids)
            ids += tokenizer.encode(f"{color} {shape}")
            if len(ids) + 1 > context:
                ids = ids[:start]
                break
            spans[row, slot] = torch.tensor([start, len(ids)])
            lexeme_mask[row, slot] = True
            keys[row, slot] = stable_key(shape)
        ids.append(tokenizer.eot_token_id)
        tokens[row, : len(ids)] = torch.tensor(ids)

    corners = torch.rand(batch_size, max_regions, 2, 2, generator=generator)
    low, high = corners.min(dim=2).values, corners.max(dim=2).values
    boxes = torch.cat([low, torch.maximum(high, low + 0.05).clamp(max=1.0)], dim=-1)
    box_counts = torch.randint(1, max_regions + 1, (batch_size, 1), generator=generator)
    box_mask = torch.arange(max_regions)[None] < box_counts
    return {
        "images": torch.randn(batch_size, 3, *image_size, generator=generator),
        "tokens": tokens,
        "boxes": boxes,
        "box_mask": box_mask,
        "lexeme_spans": spans,
        "lexeme_mask": lexeme_mask,
        "lexeme_keys": keys,
    }
