"""Named MethodConfigs: the readings of the paper a user picks by name with `--method NAME`.

A preset is a starting point, not a mode: every MethodConfig flag given beside `--method`
overrides that field. docs/method.md lists each preset's fields, and tests/test_presets.py pins
them to that table, so the docs and the code cannot drift apart.
"""

from __future__ import annotations

from .config import MethodConfig

METHOD_PRESETS: dict[str, MethodConfig] = {
    # The shipped default: word lexemes, lexeme -> image LRC, GR anchored to the starting model
    # (a teacher: every step is compared with the starting model's embeddings, which jobs.train
    # computes once per dataset).
    "harmoclip": MethodConfig(),
    # The paper read literally: noun-chunk lexemes, both LRC directions, region-based contrastive
    # GR, every weight 1. No teacher.
    "paper": MethodConfig(lexeme_unit="noun_chunk", lrc_region_to_lexeme=True, gr_mode="contrastive",
                          lambda_gc=1.0, lambda_lrc=1.0, lambda_gr=1.0),
    # The baseline every claim is paired with: plain CLIP fine-tuning on the same code path.
    "gc_only": MethodConfig(lambda_lrc=0.0, lambda_gr=0.0),
    # The trade-off of earlier region methods: region supervision without the global loss.
    "region_only": MethodConfig(lambda_gc=0.0, lambda_gr=0.0),
    # Teacher-free: GC + word lexeme -> image LRC, GR off; what WiSE-FT interpolates.
    "lrc_only": MethodConfig(lambda_gr=0.0),
    # Teacher-free: the LRC above with the weight-space L2-SP pull towards the starting weights.
    "l2sp": MethodConfig(lambda_gr=0.0, l2sp=50.0),
    # Teacher-free and region-based: the LRC above with GR consistency (fused regions vs the
    # stop-gradient global image embedding).
    "consistency": MethodConfig(gr_mode="consistency", lambda_gr=1.0),
}
DEFAULT_METHOD = "harmoclip"


def method_preset(name: str) -> MethodConfig:
    """The preset called `name`, or a ValueError listing the names there are."""
    if name not in METHOD_PRESETS:
        raise ValueError(f"--method {name!r} is not a preset; choose one of {', '.join(METHOD_PRESETS)}")
    return METHOD_PRESETS[name]
