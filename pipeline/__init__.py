"""Ray Data stages that turn image-caption data into prepared Parquet (schema v1), and the readers
that feed training and evaluation from it."""

import pyarrow as pa
import ray.data


def table_blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """`table` cut into blocks of `rows_per_block` rows (zero-copy slices; an empty table stays one
    empty block), so the stages that follow get batches of that size in parallel instead of one
    block holding everything."""
    return [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)] or [table]


def dataset_of(table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    """A driver-side table as a Ray Dataset of `table_blocks`."""
    return ray.data.from_arrow(table_blocks(table, rows_per_block))


def report_progress_to_log(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """Inside a Ray worker (a Train worker, a Tune trial) Ray Data would draw tqdm bars into the
    driver's output; this sends that progress to Ray Data's INFO log instead, which jobs show only
    with --verbose. A driver at a terminal keeps its progress bars."""
    dataset.context.use_ray_tqdm = False
    return dataset
