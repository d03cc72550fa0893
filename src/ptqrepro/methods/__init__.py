"""Quantization methods: each works on one layer's tensors and statistics, never on a model."""
