"""Model sources (hub id, local directory, GGUF inside a package) and per-architecture adapters."""
