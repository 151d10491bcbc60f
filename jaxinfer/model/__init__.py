"""Device-side model: parameters, layers, attention dispatch, forward pass."""
