"""Attention and matmul kernels: a pure-jnp reference beside each Pallas kernel.

This package imports only jax and numpy.
"""
