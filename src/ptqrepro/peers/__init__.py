"""Peer toolkits: one of our recipes run by an established implementation on the same model and
calibration token ids, so that its result can be evaluated by the same jobs and compared.

A *peer recipe* names a toolkit and the recipe of ours it mirrors::

    llmc-gptq@int4-g64: {toolkit: llm-compressor, mirrors: gptq@int4-g64}

The toolkit runs the mirrored recipe's steps with the same settings and formats, translated by its
module (``plan``, which imports nothing of the toolkit, so a config is checked without it);
whatever the toolkit cannot express is an error at planning time, whatever it
does differently is listed in the plan's ``differences`` (and in the job's result). The toolkit's
quantized model is stored as our artifact (codes and parameters on our grids), so perplexity,
zero-shot and export read it like any other. Toolkits are optional dependencies (``pip install -e
".[peers]"``): a config naming one that is not installed skips its recipes with a message.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from importlib import metadata

from ptqrepro.errors import PtqError
from ptqrepro.layerwise.pipeline import QuantizationResult

UNQUANTIZED = ["lm_head"]
"""The linears outside the decoder layers, which a peer leaves in float as our recipes do."""


@dataclass
class PeerPlan:
    """A toolkit's steps as (its name for the step, keyword arguments), and how they differ from ours."""

    steps: list[tuple[str, dict]]
    differences: list[str] = field(default_factory=list)


@dataclass
class PeerResult:
    result: QuantizationResult
    differences: list[str]
    seconds: float
    """The toolkit's own calls alone."""


@dataclass(frozen=True)
class Toolkit:
    name: str
    """As a config names it."""
    distribution: str
    """The PyPI distribution (its version goes into every result)."""
    package: str
    """The import name."""
    module: str
    """Our module that translates a recipe for it and runs it (``plan``, ``quantize``)."""

    def missing(self) -> str | None:
        """Why the toolkit cannot run here (not installed), or None."""
        if importlib.util.find_spec(self.package) is None:
            return f"{self.name} is not installed (pip install -e \".[peers]\")"
        return None

    def version(self) -> str | None:
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return None

    def translator(self):
        return importlib.import_module(self.module)


TOOLKITS = {
    "llm-compressor": Toolkit("llm-compressor", "llmcompressor", "llmcompressor", "ptqrepro.peers.llmcompressor"),
    "brevitas": Toolkit("brevitas", "brevitas", "brevitas", "ptqrepro.peers.brevitas"),
}


def toolkit(name: str) -> Toolkit:
    if name not in TOOLKITS:
        raise PtqError(f"unknown peer toolkit {name!r} (known: {', '.join(sorted(TOOLKITS))})")
    return TOOLKITS[name]
