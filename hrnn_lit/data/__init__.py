"""Data: sources (raw readers), columns (their checks, canonical ids and times),
preprocess, synthetic, batching, datamodule."""
