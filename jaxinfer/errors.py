"""Error types. Every message names the problem and, where one exists, the fix."""

from __future__ import annotations


class JaxinferError(Exception):
    """Base class of every error jaxinfer raises on purpose (never a crash dump)."""


class ConfigError(JaxinferError):
    """A model configuration is unknown, inconsistent or uses an unsupported option."""


class CheckpointError(JaxinferError):
    """A weight file is missing, truncated, corrupt, or does not match the configuration."""


class InputError(JaxinferError, ValueError):
    """A request is invalid: bad sampling values, a prompt over the context, bad shapes."""


class CapacityError(JaxinferError):
    """The KV cache cannot hold what was asked of it."""
