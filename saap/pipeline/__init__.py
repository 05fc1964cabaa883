"""saap pipeline stages: prune, evaluate, and the ``saap`` command that orchestrates them."""
