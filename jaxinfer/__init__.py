"""jaxinfer: pure-functional JAX/XLA inference for Llama-family language models."""
