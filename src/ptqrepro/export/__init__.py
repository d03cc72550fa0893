"""The quantized artifact and its exports: a Hugging Face directory, and vLLM's scoring of it."""
