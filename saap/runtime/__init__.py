"""Loading and running saap artifacts (pruned checkpoints, source models) without the pruning code."""
