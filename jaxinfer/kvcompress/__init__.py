"""KV-cache compression: eviction, merging, selection and quantization policies."""
