"""Data input: what a task asks for (`spec.DataSpec`), record sources (`sources`:
TFDS, image folders, the locally built demo and digits data sets; local or gs://),
per-record transforms run in grain workers (`views`, `transforms`, `augment`, `rgb`),
and the grain loaders that turn them into per-process uint8 batches with
checkpointable iterators (`pipeline`, `samplers`); `data_config` lists the fields."""
