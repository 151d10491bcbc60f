"""jaxinfer: pure-functional JAX/XLA inference for Llama-family language models.

Script users: `jaxinfer.load(path).generate(prompts, SamplingParams(...))`.
Functional users: `load_model`, `forward`, `init_cache`, `build_step_batch`, `Batch`.
Weight-only quantization: `quantize_params(params, "int4")`, `QuantScheme`, `QuantizedWeight`.
"""

from jaxinfer.batch import SequenceChunk, StepBatch, build_step_batch
from jaxinfer.cache.paged import KVCache, init_cache
from jaxinfer.config import ModelConfig, RopeConfig, from_hf_config
from jaxinfer.errors import CapacityError, CheckpointError, ConfigError, InputError, JaxinferError
from jaxinfer.llm import LLM, RequestOutput, load
from jaxinfer.model.params import Params, abstract_params, init_params, logical_axes
from jaxinfer.model.sampler import sample
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.quant import QuantizedWeight, QuantScheme, quantize_params
from jaxinfer.runner import ModelRunner, generation_step
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.weights.loader import load_config, load_model, load_params

__all__ = [
    "LLM", "Batch", "CapacityError", "CheckpointError", "ConfigError", "InputError",
    "JaxinferError", "KVCache", "ModelConfig", "ModelRunner", "Params", "QuantScheme",
    "QuantizedWeight", "RequestOutput", "RopeConfig", "SamplingParams", "SequenceChunk",
    "StepBatch", "Tokenizer", "abstract_params", "build_step_batch", "forward",
    "from_hf_config", "generation_step", "init_cache", "init_params", "load", "load_config",
    "load_model", "load_params", "logical_axes", "quantize_params", "sample",
]
