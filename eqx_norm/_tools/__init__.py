"""Whole-model tools: finding and switching BatchNorm layers, the recording pass,
`recalibrate`, `diagnose`, `fold`, `from_equinox`, `match_state` and the SAM-ON
mask."""
