"""Checkpoints and placement: `save` and `load` (on one process or several),
`shard_batch` and `replicate`."""
