"""Per-layer checkpoints of a quantization job, so that a killed job resumes after its last
finished decoder layer.

A checkpoint folder holds ``fingerprint.json`` (a hash of the job's settings: a folder left by
other settings is discarded, never mixed in) and one artifact per finished layer,
``layer-0000/``, ``layer-0001/``, ... (``artifact.save_artifact``: the layer's quantized weights,
low-rank terms and changed float parameters, with the layer's records in the manifest), each
written atomically, so a kill leaves either a whole layer or none.

On resume the pipeline writes the finished layers' weights back into the model and recomputes
their outputs on the calibration inputs: the same operations on the same values as the first run,
so the result is bit for bit that of an uninterrupted run on the same machine. That costs one
forward pass per finished layer instead of storing the calibration activations (about 8 GiB per
layer for LLaMA-2-70B with 128 windows of 2048 tokens).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from ptqrepro.artifact import MANIFEST, Artifact, load_artifact, save_artifact
from ptqrepro.io import read_json, write_json

FINGERPRINT = "fingerprint.json"


class LayerCheckpoints:
    """The finished layers of one job in ``folder`` (created if needed), for settings ``fingerprint``."""

    def __init__(self, folder: str | Path, fingerprint: str, log: Callable[[str], None] = lambda message: None) -> None:
        self.folder = Path(folder)
        marker = self.folder / FINGERPRINT
        if marker.is_file() and read_json(marker) != {"fingerprint": fingerprint}:
            log(f"checkpoint {self.folder} was written with other settings: discarded")
            shutil.rmtree(self.folder)
        if not marker.is_file():
            shutil.rmtree(self.folder, ignore_errors=True)
            write_json(marker, {"fingerprint": fingerprint})

    def _layer(self, index: int) -> Path:
        return self.folder / f"layer-{index:04d}"

    def finished(self) -> int:
        """How many layers, from layer 0 on without a gap, are checkpointed."""
        count = 0
        while (self._layer(count) / MANIFEST).is_file():
            count += 1
        return count

    def save(self, index: int, layer: Artifact) -> None:
        """Write layer ``index``'s results (``layer.manifest`` holds its records) atomically."""
        save_artifact(self._layer(index), layer.quantized, layer.float_parameters, layer.manifest,
                      corrections=layer.corrections)

    def load(self, index: int) -> Artifact:
        return load_artifact(self._layer(index))

    def remove(self) -> None:
        """Delete the folder (the job finished and wrote its artifact)."""
        shutil.rmtree(self.folder, ignore_errors=True)
