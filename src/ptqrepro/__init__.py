"""ptqrepro: reproducible post-training quantization experiments for large language models."""

__version__ = "0.1.0"
