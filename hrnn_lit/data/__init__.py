"""Data: sources (raw readers), preprocess, synthetic, batching, datamodule."""
