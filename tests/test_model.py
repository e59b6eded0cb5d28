"""The model wrapper: read-outs agree with open_clip, pooling is exact, ViT-B-16 runs."""

from __future__ import annotations

import argparse
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig, ModelConfig, create_clip
from harmoclip.batch import synthetic_batch
from harmoclip.checkpoint import load_checkpoint, model_to_use, save_open_clip_weights, write_checkpoint
from harmoclip.cli import add_inference_model_arguments, inference_model_from_args
from harmoclip.optim import adamw, apply_gradients, warmup_cosine
from harmoclip.model import model_shape, pool_regions, pool_token_spans
from tests.conftest import TEST_MODEL


def test_global_embeddings_match_open_clip(model: HarmoCLIP, batch):
    with torch.no_grad():
        image = model.encode_image(batch["images"])
        text_global, text_tokens = model.encode_text(batch["tokens"])
        assert torch.allclose(image.global_, model.clip.encode_image(batch["images"], normalize=True), atol=1e-6)
        assert torch.allclose(text_global, model.clip.encode_text(batch["tokens"], normalize=True), atol=1e-6)
    grid = model.image_size[0] // model.clip.visual.patch_size[0]
    assert image.dense.shape == (6, model.clip.text_projection.shape[1], grid, grid)
    assert torch.allclose(image.dense.norm(dim=1), torch.ones(6, grid, grid), atol=1e-5)
    assert text_tokens.shape == (6, model.context_length, model.clip.text_projection.shape[1])


def test_dense_map_is_last_block_without_attention(model: HarmoCLIP, batch):
    """Independent re-derivation of the dense path with the attention weights spelled out."""
    visual = model.clip.visual
    with torch.no_grad():
        x = visual.ln_pre(torch.cat([visual.class_embedding.expand(6, 1, -1),
                                     visual.conv1(batch["images"]).flatten(2).transpose(1, 2)], 1)
                          + visual.positional_embedding)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        w_v = last.attn.in_proj_weight.chunk(3)[2]
        b_v = last.attn.in_proj_bias.chunk(3)[2]
        y = x + last.attn.out_proj(last.ln_1(x) @ w_v.T + b_v)
        y = y + last.mlp(last.ln_2(y))
        expected = F.normalize(visual.ln_post(y[:, 1:]) @ visual.proj, dim=-1)
        got = model.encode_image(batch["images"]).dense.flatten(2).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-5)


def test_full_image_box_on_constant_map_gives_the_constant():
    constant = F.normalize(torch.tensor([0.3, -1.0, 2.0, 0.5]), dim=0)
    dense = constant.view(1, 4, 1, 1).expand(2, 4, 7, 5).contiguous()
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.2, 0.3, 0.4, 0.9]], [[0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    regions = pool_regions(dense, boxes, mask)
    assert torch.allclose(regions[0, 0], constant, atol=1e-6)
    assert torch.allclose(regions[0, 1], constant, atol=1e-6)
    assert torch.allclose(regions[1, 0], constant, atol=1e-6)
    assert torch.equal(regions[1, 1], torch.zeros(4))


def test_region_pooling_averages_the_box_area():
    dense = torch.zeros(1, 2, 4, 4)
    dense[0, 0, :, :2] = 1.0  # left half points along dim 0
    dense[0, 1, :, 2:] = 1.0  # right half along dim 1
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    regions = pool_regions(dense, boxes, torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(regions[0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [2 ** -0.5, 2 ** -0.5]]), atol=1e-6)


def test_region_pooling_under_bf16_autocast_keeps_batch_index_and_coordinates_exact():
    """A batch of 300 images, image i a constant map along channel i % 4, under CPU bf16 autocast:
    each whole-image box must pool its own image (bf16 rounds 257 to 256), and a box covering only
    the right half of a 300-wide map must see only that half."""
    images, channels = 300, 4
    dense = torch.zeros(images, channels, 2, 300)
    dense[torch.arange(images), torch.arange(images) % channels] = 1.0
    dense[0, :, :, :150] = 0.0
    dense[0, 3, :, :150] = 1.0  # image 0: left half along channel 3, right half along channel 0
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(images, 1)[:, None]
    boxes[0, 0] = torch.tensor([0.6, 0.0, 1.0, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        regions = pool_regions(dense.bfloat16(), boxes, torch.ones(images, 1, dtype=torch.bool))
    expected = F.one_hot(torch.arange(images) % channels, channels).float()
    assert regions.dtype == torch.bfloat16
    assert torch.equal(regions[:, 0].float().argmax(-1), expected.argmax(-1))
    assert torch.allclose(regions[:, 0].float(), expected, atol=1e-2)


def test_token_span_pooling_is_a_manual_mean():
    tokens = torch.randn(2, 10, 3)
    spans = torch.tensor([[[1, 4], [4, 5]], [[2, 3], [0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    got = pool_token_spans(tokens, spans, mask)
    assert torch.allclose(got[0, 0], F.normalize(tokens[0, 1:4].mean(0), dim=0), atol=1e-6)
    assert torch.allclose(got[0, 1], F.normalize(tokens[0, 4], dim=0), atol=1e-6)
    assert torch.allclose(got[1, 0], F.normalize(tokens[1, 2], dim=0), atol=1e-6)
    assert torch.equal(got[1, 1], torch.zeros(3))


def test_separate_text_lexemes_encode_each_lexeme_alone(model: HarmoCLIP, batch):
    tokenizer = open_clip.get_tokenizer(TEST_MODEL)
    lexeme_tokens = tokenizer(["red circle", "blue square", "", ""]).view(1, 4, -1).repeat(6, 1, 1)
    lexeme_mask = torch.tensor([True, True, False, False]).repeat(6, 1)
    features = model.encode_lexemes_as_texts(lexeme_tokens, lexeme_mask)
    with torch.no_grad():
        expected = model.clip.encode_text(tokenizer(["red circle"]), normalize=True)[0]
    assert torch.allclose(features[3, 0], expected, atol=1e-6)
    assert torch.equal(features[0, 2], torch.zeros_like(expected))

    model.method = MethodConfig(lexeme_embedding="separate_text")
    losses = HarmoCLIPLoss(model.method)(model({**batch, "lexeme_tokens": lexeme_tokens, "lexeme_mask": lexeme_mask}))
    losses["lrc"].backward()
    assert model.clip.token_embedding.weight.grad.abs().sum() > 0


def test_vit_b_16_runs_at_224_without_weights():
    torch.manual_seed(0)
    model = HarmoCLIP(create_clip(ModelConfig(name="ViT-B-16")))
    batch = synthetic_batch("ViT-B-16", model.image_size, batch_size=2, max_regions=3, max_lexemes=2)
    assert batch["images"].shape[-2:] == (224, 224)
    with torch.no_grad():
        losses = HarmoCLIPLoss(model.method)(model(batch))
        dense = model.encode_image(batch["images"][:1]).dense
    assert dense.shape == (1, 512, 14, 14)
    assert all(torch.isfinite(losses[k]) for k in ("gc", "lrc", "gr"))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saved_weights_load_with_plain_open_clip(model: HarmoCLIP, tmp_path):
    with torch.no_grad():
        model.clip.logit_scale.fill_(3.21)  # differs from any fresh init
    path = save_open_clip_weights(model.clip, str(tmp_path / "w" / "open_clip_weights.pt"))
    loaded = open_clip.create_model(TEST_MODEL, pretrained=path)
    _assert_same_weights(model.clip, loaded)
    assert not list(tmp_path.glob("w/*.partial"))


def test_weights_round_trip_through_s3(model: HarmoCLIP, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the download cache lives under ~/.cache
    uri = save_open_clip_weights(model.clip, f"s3://{bucket}/checkpoints/open_clip_weights.pt")
    loaded = create_clip(ModelConfig(name=TEST_MODEL, pretrained=uri))
    _assert_same_weights(model.clip, loaded)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_clip(ModelConfig(name=TEST_MODEL, pretrained=str(tmp_path / "nope.pt")))


METHOD_WITH_TEMPERATURES = MethodConfig(lrc_learnable_temperature=True, gr_learnable_temperature=True,
                                        gr_mode="contrastive")


def test_checkpoint_restores_weights_optimizer_scheduler_and_temperatures_exactly(tmp_path):
    def fresh(seed: int):
        torch.manual_seed(seed)
        model = HarmoCLIP(create_clip(ModelConfig(name="harmo-micro")), METHOD_WITH_TEMPERATURES)
        optimizer = adamw(model, 1e-3, 0.1)
        return model, optimizer, warmup_cosine(optimizer, 2, 10)

    model, optimizer, scheduler = fresh(0)
    batch = synthetic_batch("harmo-micro", model.image_size, batch_size=4, max_regions=3, max_lexemes=2, seed=0)
    for _ in range(3):
        apply_gradients(HarmoCLIPLoss(model.method)(model(batch))["loss"], model, optimizer, scheduler, 1.0)
    write_checkpoint(str(tmp_path), model.clip, optimizer, scheduler, 3, {}, model.loss_parameters())

    restored, restored_optimizer, restored_scheduler = fresh(1)  # other initial weights
    assert load_checkpoint(str(tmp_path), restored, restored_optimizer, restored_scheduler) == 3
    for (name, saved), (_, loaded) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(saved, loaded), name
    saved_state, loaded_state = optimizer.state_dict()["state"], restored_optimizer.state_dict()["state"]
    assert saved_state.keys() == loaded_state.keys()
    for key in saved_state:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved_state[key][field], loaded_state[key][field]), (key, field)
    assert restored_scheduler.state_dict() == scheduler.state_dict()
    assert set(restored.loss_parameters()) == {"lrc_logit_scale", "gr_logit_scale"}  # compared with the rest above


def test_image_size_is_one_flag_for_every_job_and_a_run_keeps_its_own(micro_weights, tmp_path):
    """--image-size builds the model at that side (position embedding interpolated from weights
    made at 32 px), decode tasks resize to it, and a run folder that recorded it is loaded at it."""
    model = ModelConfig(name="harmo-micro", pretrained=micro_weights, image_size=48)
    assert tuple(create_clip(model).visual.image_size) == (48, 48)
    assert model_shape(model) == (48, 32) and model_shape(ModelConfig(name="harmo-micro")) == (32, 32)
    run = tmp_path / "run"
    run.mkdir()
    (run / "harmoclip.json").write_text(json.dumps({"model": {"name": "harmo-micro", "image_size": 48}}))
    assert model_to_use(str(run), None, None).image_size == 48
    assert model_to_use(str(run), None, None, image_size=64).image_size == 64
    parser = argparse.ArgumentParser()
    add_inference_model_arguments(parser)
    args = parser.parse_args(["--checkpoint", micro_weights, "--model", "harmo-micro", "--image-size", "40"])
    assert inference_model_from_args(args) == ModelConfig(name="harmo-micro", pretrained=micro_weights, image_size=40)
