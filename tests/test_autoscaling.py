"""On an autoscaling cluster (cluster.yaml and the KubeRay RayCluster start with no GPU worker), the
sizes the jobs pick by default follow what the cluster can grow to, not what it holds when the job
starts: jobs.tune's trials at once, jobs.evaluate / jobs.embed's model actors. Explicit flags win.
Pure functions: no Ray is started here."""

from __future__ import annotations

import pytest
from ray.data import ActorPoolStrategy

from harmoclip.config import InferenceConfig
from jobs import tune as tune_job
from pipeline import embedders

NO_GPU_YET = {"CPU": 8.0}  # an autoscaling cluster at start: the head only


def test_a_gpu_sweep_runs_every_trial_at_once_whatever_the_cluster_holds_at_start():
    for now in (NO_GPU_YET, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 64.0, "GPU": 8.0}):
        assert tune_job.trial_concurrency(16, 4, gpu=True, now=now) == 16


def test_a_gpu_sweep_is_capped_by_the_autoscalers_maximum_where_ray_reports_it():
    most = {"CPU": 104.0, "GPU": 8.0}  # cluster.yaml at its maximum: head, 4 CPU and 8 GPU workers
    assert tune_job.trial_concurrency(16, 4, gpu=True, most=most, now=NO_GPU_YET) == 2
    assert tune_job.trial_concurrency(16, 1, gpu=True, most=most, now=NO_GPU_YET) == 8
    assert tune_job.trial_concurrency(3, 1, gpu=True, most=most, now=NO_GPU_YET) == 3  # never more than the trials
    assert tune_job.trial_concurrency(16, 16, gpu=True, most=most, now=NO_GPU_YET) == 1  # at least one


def test_a_cpu_sweep_fits_the_cpus_counting_the_maximum_where_known():
    local = {"CPU": 4.0}  # jobs.common.init_ray on 2 cores: no autoscaler, so this is the maximum
    assert tune_job.trial_concurrency(4, 2, gpu=False, now=local) == 1  # 4 // (2 + 2)
    assert tune_job.trial_concurrency(4, 2, gpu=False, now={"CPU": 16.0}) == 4
    assert tune_job.trial_concurrency(4, 2, gpu=False, most={"CPU": 40.0}, now=local) == 4
    assert tune_job.trial_concurrency(20, 2, gpu=False, most={"CPU": 40.0}, now=local) == 10
    assert tune_job.trial_concurrency(4, 8, gpu=False, now=local) == 1  # at least one


@pytest.mark.parametrize("gpu", [True, False])
def test_max_concurrent_wins(gpu):
    for most, now in ((None, NO_GPU_YET), ({"CPU": 104.0, "GPU": 8.0}, NO_GPU_YET), (None, {"CPU": 4.0})):
        assert tune_job.trial_concurrency(16, 4, gpu, max_concurrent=3, most=most, now=now) == 3


def test_trial_count_is_the_grid_times_the_samples():
    args = tune_job.build_parser().parse_args(["--data", "d", "--val-data", "v", "--out", "o", "--samples", "2"])
    space = tune_job.param_space(args, tune_job.method_from_args(args))
    assert tune_job.trial_count(space, args.samples) == 2 * 2 * 2  # default grids: lrc 0 1, gr 0 10
    assert tune_job.trial_count({"lambda_lrc": object()}, 5) == 5  # random search: --samples


def test_max_concurrent_parses_and_defaults_to_none():
    parse = tune_job.build_parser().parse_args
    assert parse(["--data", "d", "--val-data", "v", "--out", "o"]).max_concurrent is None
    assert parse(["--data", "d", "--val-data", "v", "--out", "o", "--max-concurrent", "4"]).max_concurrent == 4


def test_gpu_model_actors_grow_with_the_cluster_and_actors_wins():
    assert embedders.actor_pool_size(None, gpu=True) == (1, None)  # no cap of ours: the cluster bounds it
    assert embedders.actor_pool_size(None, gpu=False) == (1, 1)  # one CPU actor uses every core of its node
    assert embedders.actor_pool_size(6, gpu=True) == (6, 6)
    assert embedders.actor_pool_size(2, gpu=False) == (2, 2)
    with pytest.raises(ValueError, match="--actors must be >= 1"):
        embedders.actor_pool_size(0, gpu=True)


def test_the_ray_data_pool_autoscales_only_without_actors():
    grows = embedders._actor_pool(InferenceConfig(gpu=True))
    assert isinstance(grows["compute"], ActorPoolStrategy) and grows["num_gpus"] == 1
    assert (grows["compute"].min_size, grows["compute"].max_size) == (1, float("inf"))
    fixed = embedders._actor_pool(InferenceConfig(gpu=True, actors=4))["compute"]
    assert (fixed.min_size, fixed.max_size) == (4, 4)
    assert embedders._actor_pool(InferenceConfig())["compute"].max_size == 1
