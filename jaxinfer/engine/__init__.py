"""The serving engine: requests, scheduler, KV page management, continuous batching."""

from jaxinfer.engine.core import EngineConfig, EngineCore
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.outputs import EngineStats, RequestDelta, TokenLogprob

__all__ = ["Engine", "EngineConfig", "EngineCore", "EngineStats", "RequestDelta",
           "TokenLogprob"]
