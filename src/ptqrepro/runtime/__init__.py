"""Run-time plumbing: jobs on GPUs and schedulers, signals, atomic files, the hub cache, provenance."""
