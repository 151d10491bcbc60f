"""Model configuration: one frozen, hashable dataclass for every supported family.

Families differ in a small table of switches (see `FAMILY_SWITCHES`), not in code paths.
Built from a Hugging Face `config.json` (transformers v4 or v5 layout) or GGUF metadata.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from jaxinfer.errors import ConfigError

Family = Literal["llama", "mistral", "qwen2", "qwen3", "gemma3"]
LayerType = Literal["full", "sliding"]
AttentionImpl = Literal["xla", "cpu", "pallas_gpu", "pallas_tpu"]
ATTENTION_IMPLS = ("xla", "cpu", "pallas_gpu", "pallas_tpu")
MatmulImpl = Literal["xla", "cpu"]
MATMUL_IMPLS = ("xla", "cpu")

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (Hugging Face `rope_parameters` semantics)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True
    # Per-frequency divisors stored by llama.cpp as `rope_freqs.weight` (Llama 3.1 GGUFs).
    freq_factors: tuple[float, ...] | None = None

    def inv_freq(self, head_dim: int, max_position_embeddings: int) -> np.ndarray:
        """Inverse frequencies [E/2] in float32, computed as transformers computes them."""
        inv = self._scaled_inv_freq(head_dim, max_position_embeddings)
        if self.freq_factors is not None:
            if len(self.freq_factors) != head_dim // 2:
                raise ConfigError(
                    f"rope_freqs has {len(self.freq_factors)} entries, expected {head_dim // 2}")
            inv = (inv / np.asarray(self.freq_factors, np.float32)).astype(np.float32)
        return inv

    def _scaled_inv_freq(self, head_dim: int, max_position_embeddings: int) -> np.ndarray:
        exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
        pos_freqs = np.power(np.float32(self.theta), exponent, dtype=np.float32)
        inv = (np.float32(1.0) / pos_freqs).astype(np.float32)
        if self.rope_type == "default":
            return inv
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            old_len = self.original_max_position_embeddings or max_position_embeddings
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        if self.rope_type == "yarn":
            return self._yarn_inv_freq(pos_freqs, head_dim, max_position_embeddings)
        raise ConfigError(f"unsupported rope type {self.rope_type!r}")

    def _yarn_inv_freq(
        self, pos_freqs: np.ndarray, head_dim: int, max_position_embeddings: int
    ) -> np.ndarray:
        original = self.original_max_position_embeddings or max_position_embeddings

        def correction_dim(rotations: float) -> float:
            return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (
                2 * math.log(self.theta)
            )

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_extra = 1.0 / pos_freqs
        inv_inter = 1.0 / (self.factor * pos_freqs)
        return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)

    @property
    def attention_scaling(self) -> float:
        """Factor applied to cos/sin (YaRN's mscale; 1 otherwise)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer. Hashable: used as a jit static arg.

    Dimension legend used across the code base: B batch, T tokens, S sequences, D model width,
    H query heads, K KV heads, E head dim, F MLP width, V vocab, P pages, C page size, L layers.
    """

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    # RoPE of sliding-window layers when it differs from `rope` (Gemma 3's local layers).
    local_rope: RopeConfig | None = None
    layer_types: tuple[LayerType, ...] = ()
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    embed_scale: float | None = None
    # Gemma stores RMSNorm weights as w with the norm applying (1 + w).
    norm_weight_offset: float = 0.0
    # Gemma 3: extra norms after attention and around the MLP.
    sandwich_norms: bool = False
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    attention_impl: AttentionImpl = "xla"
    # "cpu": native small-batch matmuls on XLA:CPU (jaxinfer.cpu_kernels); "xla": jnp dots.
    matmul_impl: MatmulImpl = "xla"

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        self.validate()

    # ----------------------------------------------------------------- derived values
    @property
    def num_query_groups(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_heads // self.num_kv_heads

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    @property
    def has_sliding_layers(self) -> bool:
        return "sliding" in self.layer_types

    @property
    def sliding_layer_mask(self) -> np.ndarray:
        """[L] bool: which layers use the sliding window."""
        return np.array([t == "sliding" for t in self.layer_types], dtype=bool)

    def num_params(self) -> int:
        d, f, e = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = d * e * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * d * f
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + head

    def validate(self) -> None:
        """Refuse inconsistent or unsupported settings with a message naming them."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        bad = set(self.layer_types) - {"full", "sliding"}
        if bad:
            raise ConfigError(f"unknown layer types {sorted(bad)}; expected 'full' or 'sliding'")
        if self.has_sliding_layers and not self.sliding_window:
            raise ConfigError("sliding-window layers need a positive sliding_window")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"unsupported activation {self.hidden_act!r}; supported: {SUPPORTED_ACTIVATIONS}"
            )
        for rope in (self.rope, self.local_rope):
            if rope is not None and rope.rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"unsupported rope type {rope.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
                )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"unsupported dtype {self.dtype!r}; use float32 or bfloat16")
        if self.matmul_impl not in MATMUL_IMPLS:
            raise ConfigError(
                f"unknown matmul_impl {self.matmul_impl!r}; use one of {MATMUL_IMPLS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"unknown attention_impl {self.attention_impl!r}; use one of {ATTENTION_IMPLS}")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (e.g. `cfg.replace(dtype="bfloat16")`)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- HF config.json

# model_type -> family and the switches that family fixes.
FAMILY_SWITCHES: dict[str, dict[str, Any]] = {
    "llama": dict(family="llama"),
    "mistral": dict(family="mistral"),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_norm=True),
    "gemma3_text": dict(
        family="gemma3", qk_norm=True, norm_weight_offset=1.0, sandwich_norms=True,
        hidden_act="gelu_tanh",
    ),
}

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh"}


def _rope_from_dict(params: Mapping[str, Any] | None, theta: float | None) -> RopeConfig:
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported RoPE scaling type {rope_type!r} in config; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = params.get("rope_theta", theta)
    if theta is None:
        theta = 10000.0
    kwargs: dict[str, Any] = dict(theta=float(theta), rope_type=rope_type)
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                "attention_factor"):
        if params.get(key) is not None:
            kwargs[key] = float(params[key])
    if params.get("original_max_position_embeddings") is not None:
        kwargs["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    if "truncate" in params:
        kwargs["truncate"] = bool(params["truncate"])
    for key in ("mscale", "mscale_all_dim"):
        if params.get(key):
            raise ConfigError(f"RoPE option {key!r} (DeepSeek-style YaRN) is not supported")
    return RopeConfig(**kwargs)


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def from_hf_config(config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face `config.json` dictionary.

    Args:
      config: the parsed `config.json`.
      **overrides: fields to set on the result (e.g. `dtype="bfloat16"`).

    Raises:
      ConfigError: unknown architecture or an option this framework does not implement.
    """
    model_type = config.get("model_type")
    if model_type == "gemma3" and "text_config" in config:
        raise ConfigError(
            "this is a multimodal Gemma 3 checkpoint (model_type 'gemma3'); only the text-only "
            "model (model_type 'gemma3_text') is supported"
        )
    if model_type not in FAMILY_SWITCHES:
        arch = config.get("architectures")
        raise ConfigError(
            f"unknown architecture: model_type {model_type!r} (architectures {arch}); supported: "
            f"{', '.join(sorted(FAMILY_SWITCHES))}"
        )
    switches = dict(FAMILY_SWITCHES[model_type])
    family = switches["family"]
    act = config.get("hidden_act") or config.get("hidden_activation") or switches.get(
        "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"unsupported activation {act!r} in config.json")
    switches["hidden_act"] = _ACTIVATIONS[act]
    if config.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported (no supported family uses it)")
    if config.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=true is not supported (decoder-only only)")
    if float(config.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")

    hidden = int(config["hidden_size"])
    num_heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // num_heads)
    num_layers = int(config["num_hidden_layers"])
    max_pos = int(config.get("max_position_embeddings") or 4096)

    # RoPE: transformers v5 writes `rope_parameters` (per layer type for Gemma 3); v4 wrote
    # `rope_theta` + `rope_scaling` (+ `rope_local_base_freq` for Gemma 3).
    rope_params = config.get("rope_parameters")
    theta = config.get("rope_theta")
    local_rope = None
    if family == "gemma3":
        if isinstance(rope_params, Mapping) and "full_attention" in rope_params:
            rope = _rope_from_dict(rope_params.get("full_attention"), theta)
            local_rope = _rope_from_dict(rope_params.get("sliding_attention"), 10000.0)
        else:
            rope = _rope_from_dict(config.get("rope_scaling") or rope_params, theta or 1e6)
            local_rope = RopeConfig(theta=float(config.get("rope_local_base_freq", 10000.0)))
    else:
        rope = _rope_from_dict(rope_params or config.get("rope_scaling"), theta)

    layer_types = _layer_types_from_hf(config, family, num_layers)
    sliding_window = config.get("sliding_window")
    if "sliding" not in layer_types:
        sliding_window = None

    query_scale = None
    if family == "gemma3":
        query_scale = float(config.get("query_pre_attn_scalar", head_dim)) ** -0.5
        switches["embed_scale"] = hidden**0.5
    if config.get("attention_bias"):
        # Llama-style attention_bias puts biases on q, k, v and o.
        switches["qkv_bias"] = True
        switches["o_bias"] = family not in ("qwen2",)

    fields: dict[str, Any] = dict(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope=rope,
        local_rope=local_rope,
        layer_types=layer_types,
        sliding_window=int(sliding_window) if sliding_window else None,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", family == "gemma3")),
        query_scale=query_scale,
        attn_logit_softcap=config.get("attn_logit_softcapping"),
        final_logit_softcap=config.get("final_logit_softcapping"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_as_tuple(config.get("eos_token_id")),
        pad_token_id=config.get("pad_token_id"),
        **switches,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _layer_types_from_hf(
    config: Mapping[str, Any], family: str, num_layers: int
) -> tuple[LayerType, ...]:
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    if config.get("layer_types"):
        types = []
        for t in config["layer_types"]:
            if t not in names:
                raise ConfigError(f"unsupported layer type {t!r} in config.json layer_types")
            types.append(names[t])
        if family in ("qwen2", "qwen3") and not config.get("use_sliding_window"):
            types = ["full"] * num_layers
        return tuple(types)  # type: ignore[return-value]
    window = config.get("sliding_window")
    if family == "gemma3":
        pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern")
                      or 6)
        return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))
    if family == "mistral" and window:
        return ("sliding",) * num_layers
    if family in ("qwen2", "qwen3") and config.get("use_sliding_window") and window:
        first = int(config.get("max_window_layers", num_layers))
        return tuple("sliding" if i >= first else "full" for i in range(num_layers))
    return ("full",) * num_layers


# --------------------------------------------------------------------------- GGUF metadata

_GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2",
                            "qwen3": "qwen3", "gemma3": "gemma3_text"}


def hf_config_from_gguf_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Translate GGUF metadata (key -> value) into a Hugging Face style config dict."""
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCH_TO_MODEL_TYPE:
        raise ConfigError(
            f"unknown GGUF architecture {arch!r}; supported: "
            f"{', '.join(sorted(_GGUF_ARCH_TO_MODEL_TYPE))}"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in required if get(k) is None]
    if missing:
        raise ConfigError(f"GGUF metadata is missing {', '.join(missing)}")
    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ConfigError("GGUF metadata has neither vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens)
    config: dict[str, Any] = dict(
        model_type=_GGUF_ARCH_TO_MODEL_TYPE[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        max_position_embeddings=int(get("context_length", 4096)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling: dict[str, Any] = {"rope_type": scaling_type}
        if get("rope.scaling.factor") is not None:
            scaling["factor"] = float(get("rope.scaling.factor"))
        if get("rope.scaling.original_context_length") is not None:
            scaling["original_max_position_embeddings"] = int(
                get("rope.scaling.original_context_length"))
        config["rope_scaling"] = scaling
    window = get("attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)
    if arch == "gemma3":
        # llama.cpp's Gemma 3 conventions: every 6th layer global, local RoPE base 10k,
        # query scaled by head_dim**-0.5 (query_pre_attn_scalar == head_dim).
        config.update(rope_local_base_freq=10000.0, sliding_window_pattern=6,
                      query_pre_attn_scalar=config["head_dim"],
                      hidden_activation="gelu_pytorch_tanh")
    return config
