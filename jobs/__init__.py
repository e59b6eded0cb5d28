"""Entry points, run as `python -m jobs.<name>` locally or through `ray job submit`."""
