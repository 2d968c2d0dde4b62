"""The instability experiment: the Equinox report's MNIST CNN with each approach
(and SAM), its run, claims, table and figure."""
