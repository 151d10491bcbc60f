"""Tests of jaxinfer.train."""
