"""The weight-space ways to keep what the starting model knew, without a second model:
WiSE-FT (jobs.interpolate) and L2-SP (MethodConfig.l2sp, harmoclip.optim.adamw)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from harmoclip import ModelConfig, create_clip
from harmoclip.checkpoint import CONFIG_FILENAME, WEIGHTS_FILENAME, model_to_use, save_open_clip_weights
from harmoclip.optim import adamw
from jobs import interpolate
from tests.conftest import TEST_MODEL


def _weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture
def fine_tuned_run(micro_weights, tmp_path) -> str:
    """A run folder as jobs.train leaves it, fine-tuned from `micro_weights` (other weights: seed 1)."""
    run = tmp_path / "run"
    torch.manual_seed(1)
    save_open_clip_weights(create_clip(ModelConfig(name=TEST_MODEL)), str(run / WEIGHTS_FILENAME))
    (run / CONFIG_FILENAME).write_text(json.dumps(
        {"model": {"name": TEST_MODEL, "pretrained": micro_weights, "init_from": None, "image_size": None},
         "method": {}, "step": 10}))
    return str(run)


def test_wise_ft_endpoints_are_exact_and_blends_load_as_runs(fine_tuned_run, micro_weights, tmp_path):
    folders = interpolate.main(["--checkpoint", fine_tuned_run, "--alpha", "0", "0.5", "1", "--out",
                                str(tmp_path / "wise")])
    assert [os.path.basename(f) for f in folders] == ["alpha0", "alpha0.5", "alpha1"]
    start, end = _weights(micro_weights), _weights(f"{fine_tuned_run}/{WEIGHTS_FILENAME}")
    at_zero, half, at_one = (_weights(f"{folder}/{WEIGHTS_FILENAME}") for folder in folders)
    changed = [name for name in start if start[name].is_floating_point() and not torch.equal(start[name], end[name])]
    assert changed, "the two endpoints must differ for the test to mean anything"
    for name in start:  # bit for bit at both ends
        assert torch.equal(at_zero[name], start[name]), name
        assert torch.equal(at_one[name], end[name]), name
    for name in changed:  # WiSE-FT's definition at alpha 0.5: the midpoint
        torch.testing.assert_close(half[name], (start[name] + end[name]) / 2)
    # A blend is a run folder: inference jobs load it with --checkpoint, at the blended weights.
    loaded = create_clip(model_to_use(folders[1], None, None)).state_dict()
    assert all(torch.equal(loaded[name], half[name]) for name in half)
    assert json.loads(open(f"{folders[1]}/{CONFIG_FILENAME}").read())["interpolation"]["alpha"] == 0.5


def test_wise_ft_refuses_a_run_without_starting_weights_or_a_bad_alpha(fine_tuned_run, tmp_path, capsys):
    config = json.loads(open(f"{fine_tuned_run}/{CONFIG_FILENAME}").read())
    with pytest.raises(SystemExit) as bad_alpha:
        interpolate.main(["--checkpoint", fine_tuned_run, "--alpha", "1.5", "--out", str(tmp_path / "a")])
    assert bad_alpha.value.code == 2 and "--alpha 1.5" in capsys.readouterr().err
    config["model"]["pretrained"] = None
    open(f"{fine_tuned_run}/{CONFIG_FILENAME}", "w").write(json.dumps(config))
    with pytest.raises(SystemExit) as no_start:
        interpolate.main(["--checkpoint", fine_tuned_run, "--out", str(tmp_path / "b")])
    assert no_start.value.code == 2 and "random weights" in capsys.readouterr().err


def _linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


def _zero_gradient_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Steps whose loss has zero gradient: only the weight decay moves the weights."""
    for _ in range(steps):
        optimizer.zero_grad()
        (0 * sum(p.sum() for p in model.parameters())).backward()
        optimizer.step()


def test_l2sp_decays_towards_the_starting_weights_not_towards_zero():
    start = _linear(0)
    start_weights = {k: v.clone() for k, v in start.state_dict().items()}
    for l2sp, target in ((5.0, "start"), (0.0, "zero")):
        model = _linear(0)
        optimizer = adamw(model, lr=0.01, weight_decay=5.0, l2sp=l2sp)  # the start is the weights now
        with torch.no_grad():  # then training moved them away
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        _zero_gradient_steps(model, optimizer, 400)
        for name, value in model.state_dict().items():
            if value.ndim < 2:  # biases get no decay of either kind
                continue
            expected = start_weights[name] if target == "start" else torch.zeros_like(value)
            torch.testing.assert_close(value, expected, atol=1e-3, rtol=0)


def test_l2sp_start_is_taken_before_a_checkpoint_is_loaded():
    """jobs.train builds the optimizer, then resumes: the pull must stay towards the run's start."""
    model = _linear(0)
    start_weights = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = adamw(model, lr=0.01, weight_decay=0.0, l2sp=5.0)
    model.load_state_dict(_linear(3).state_dict())  # as load_checkpoint does after adamw()
    _zero_gradient_steps(model, optimizer, 400)
    torch.testing.assert_close(model[0].weight, start_weights["0.weight"], atol=1e-3, rtol=0)
