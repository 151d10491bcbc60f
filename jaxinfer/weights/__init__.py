"""Weight files: Hugging Face safetensors and GGUF readers, name maps, loaders."""
