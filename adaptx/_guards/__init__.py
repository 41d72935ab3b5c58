"""Guards: skip bad steps instead of applying them."""
