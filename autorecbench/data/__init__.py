"""Data layer: raw-format loaders, the Parquet cache, synthetic generators and device-resident streams."""
