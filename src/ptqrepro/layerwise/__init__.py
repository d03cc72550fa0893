"""A recipe run layer by layer: calibration statistics, the driver, tensor placement, per-layer checkpoints, DWR's search."""
