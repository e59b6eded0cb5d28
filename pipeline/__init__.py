"""Ray Data stages that turn image-caption data into prepared Parquet (schema v1), and the readers
that feed training and evaluation from it."""

import ray.data


def report_progress_to_log(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """Inside a Ray worker (a Train worker, a Tune trial) Ray Data would draw tqdm bars into the
    driver's output; this sends that progress to Ray Data's INFO log instead, which jobs show only
    with --verbose. A driver at a terminal keeps its progress bars."""
    dataset.context.use_ray_tqdm = False
    return dataset
