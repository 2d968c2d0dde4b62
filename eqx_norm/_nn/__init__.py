"""The layer: `BatchNorm`, its approaches, the groups a batch splits into, the
kernels, its served form, and the entry a recording pass writes."""
