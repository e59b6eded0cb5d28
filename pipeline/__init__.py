"""Ray Data stages that turn image-caption data into prepared Parquet (schema v1)."""
