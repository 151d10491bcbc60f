"""Write a small llama GGUF for tests: the metadata llama.cpp's loader reads, then tensors
(float32 as given, or quantized to a ggml type by gguf-py)."""

from __future__ import annotations

from collections.abc import Iterable

import gguf
import numpy as np


def write_llama_gguf(path, *, num_layers: int, context_length: int, hidden_size: int,
                     intermediate_size: int, num_heads: int, num_kv_heads: int,
                     rms_norm_eps: float, rope_theta: float, vocab_size: int,
                     tensors: Iterable[tuple[str, np.ndarray, str | None]]) -> None:
    """`tensors`: (GGUF name, array in llama.cpp's layout, ggml type name or None for the
    array's own dtype)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(num_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(hidden_size)
    w.add_feed_forward_length(intermediate_size)
    w.add_head_count(num_heads)
    w.add_head_count_kv(num_kv_heads)
    w.add_layer_norm_rms_eps(rms_norm_eps)
    w.add_rope_freq_base(rope_theta)
    w.add_vocab_size(vocab_size)
    for name, array, qtype in tensors:
        array = np.ascontiguousarray(array)
        if qtype is None:
            w.add_tensor(name, array)
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
