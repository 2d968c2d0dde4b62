"""The SAM family: the contract between an optimizer and the training step, `sam`,
`looksam`, `msam` and `sam_step`. Nothing here imports the layer."""
