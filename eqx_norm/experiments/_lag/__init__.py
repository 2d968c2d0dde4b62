"""The lag experiment: how far running statistics fall behind moving weights, in
four regimes."""
