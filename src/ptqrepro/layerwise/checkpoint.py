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

One job at a time: the folder's ``lock`` file carries an exclusive ``flock`` for the job's lifetime
and the holder's PID. A second job on the folder (Snakemake rerun while the first, orphaned by a
killed Snakemake, still runs) stops at once with a ``PtqError`` naming the folder and that PID. The
kernel drops the lock when its process dies, so a killed job's lock never blocks the resume.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable

from ptqrepro.export.artifact import MANIFEST, Artifact, load_artifact, save_artifact
from ptqrepro.errors import PtqError
from ptqrepro.runtime.io import read_json, write_json

FINGERPRINT = "fingerprint.json"
LOCK = "lock"

_HELD: dict[Path, int] = {}
"""The folders whose lock this process holds, with the lock file's descriptor: the lock is the
process's, so that it may open its own folder again."""


def _acquire(folder: Path) -> int:
    """Take the exclusive lock of ``folder`` (created if needed) and write this process's PID into
    its lock file; the lock file's descriptor. A lock held by another process is a ``PtqError``."""
    path = folder / LOCK
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode().strip() or "unknown"
            os.close(descriptor)
            raise PtqError(f"checkpoint folder {folder} is in use by another job (PID {holder}): "
                           "stop that job or wait for it to end") from None
        if _still_linked(descriptor, path):
            break
        os.close(descriptor)  # the holder removed the folder as we opened its lock file: take the new one
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


def _still_linked(descriptor: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``descriptor``."""
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


class LayerCheckpoints:
    """The finished layers of one job in ``folder`` (created if needed), for settings ``fingerprint``,
    locked for this process until ``remove`` or ``release`` (or the end of a ``with`` block)."""

    def __init__(self, folder: str | Path, fingerprint: str, log: Callable[[str], None] = lambda message: None) -> None:
        self.folder = Path(folder)
        self._key = self.folder.resolve()
        if self._key not in _HELD:
            _HELD[self._key] = _acquire(self.folder)
        marker = self.folder / FINGERPRINT
        if marker.is_file() and read_json(marker) != {"fingerprint": fingerprint}:
            log(f"checkpoint {self.folder} was written with other settings: discarded")
            self._clear()
        if not marker.is_file():
            self._clear()
            write_json(marker, {"fingerprint": fingerprint})

    def __enter__(self) -> LayerCheckpoints:
        return self

    def __exit__(self, *exception) -> None:
        self.release()

    def _clear(self) -> None:
        """Delete everything in the folder but its lock file."""
        for entry in self.folder.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

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
        """Delete the folder (the job finished and wrote its artifact) and the folders above it that
        are left empty (``results/checkpoints/<model>/<recipe>``, up to the first that holds another
        job's checkpoints or anything else; never the working directory or one above it), and
        release the folder's lock."""
        shutil.rmtree(self.folder, ignore_errors=True)
        keep = {Path.cwd(), *Path.cwd().parents}
        for parent in self.folder.absolute().parents:
            if parent in keep:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty
                break
        self.release()

    def release(self) -> None:
        """Let another job take the folder (the kernel does so when this process ends)."""
        descriptor = _HELD.pop(self._key, None)
        if descriptor is not None:
            os.close(descriptor)
