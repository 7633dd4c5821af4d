"""Data input: record sources (TFDS, image folders, the embedded demo data set),
per-record image transforms run in grain workers, and the grain loaders that
turn them into per-process uint8 batches with checkpointable iterators."""
