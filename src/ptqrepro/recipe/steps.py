"""The glue between the layer-by-layer pipeline and the methods.

A step receives a ``LayerContext``: one decoder layer, its linear modules, the calibration
statistics of their inputs and the recipe's weight format. A recipe's steps come in three kinds,
in this order:

* *transforms* (SmoothQuant, AWQ, MagR) change float weights, in a way the float model does not
  notice (scales folded into the previous op) or within a small output error (clipping, MagR);
* one *quantizer* (RTN, GPTQ) fills ``context.quantized`` with one ``QuantizedWeight`` per linear;
* *refinements* (coordinate descent, LQER/L2QER) work on the quantizer's result: new codes on
  the same grid, or a low-rank correction term beside the weight (``context.corrections``).

Methods only ever see tensors; this module reads and writes the modules.
"""

from __future__ import annotations

import re
import time
import types
import typing
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Callable, ClassVar

import torch
from torch import nn

from ptqrepro.errors import PtqError
from ptqrepro.formats import GroupedFormat, QuantizedWeight
from ptqrepro.methods.awq import apply_clip, search_clip, search_scales
from ptqrepro.formats.parse import parse_format
from ptqrepro.formats.lowrank import QuantizedLowRank, quantize_low_rank
from ptqrepro.methods.gptq import GROUP_MODES, gptq
from ptqrepro.methods.lqer import activation_scale, low_rank_correction
from ptqrepro.methods.magr import coordinate_descent, magr
from ptqrepro.methods.rtn import rtn
from ptqrepro.methods.smoothquant import smoothing_scales
from ptqrepro.models.adapters import Architecture
from ptqrepro.models.shapes import ModelShapes
from ptqrepro.models.sources import compute_dtype, torch_dtype
from ptqrepro.layerwise.statistics import InputStatistics, relative_output_error


def _allowed_types(hint) -> tuple:
    """The types a dataclass field's type hint allows: each member of a union (``int | None``), else
    the hint itself (``tuple[float, ...]`` is one type)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _is_of_type(value, kind: type) -> bool:
    """Whether a step's setting ``value`` (from YAML) has the dataclass field's type ``kind``: an
    integer counts as a float, a boolean as neither an integer nor a float; a YAML list is a
    ``tuple[X, ...]`` or ``list[X]`` whose items are all of type X."""
    if typing.get_origin(kind) in (tuple, list):
        items = [item for item in typing.get_args(kind) if item is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(any(_is_of_type(v, item) for item in items) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass
class LayerContext:
    index: int
    prefix: str  # qualified name of the decoder layer, e.g. "model.layers.3"
    layer: nn.Module
    arch: Architecture
    linears: dict[str, nn.Linear]
    weight_format: GroupedFormat
    stats: dict[str, InputStatistics] | None = None
    original: dict[str, torch.Tensor] = field(default_factory=dict)  # float weights before any step
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    corrections: dict[str, QuantizedLowRank] = field(default_factory=dict)
    notes: dict[str, dict] = field(default_factory=dict)  # per-linear facts a step reports
    changed: set[str] = field(default_factory=set)  # non-linear parameters a step modified
    module_output: Callable[[str, dict[str, torch.Tensor]], list[torch.Tensor]] | None = None
    """``module_output(module, weights)``: the output of the layer's submodule ``module`` on its
    calibration inputs (one tensor per batch), with the named linears given ``weights`` for the
    call; present for the modules the recipe's ``Step.inspected_modules`` asked for."""

    def qualified(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def note(self, linear: str, **facts) -> None:
        self.notes.setdefault(linear, {}).update(facts)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """RTN in the recipe's weight format (what AWQ's searches quantize with)."""
        return rtn(weight, self.weight_format, self.prefix).dequantize()

    def fold_scale(self, source: str, targets: tuple[str, ...], s: torch.Tensor) -> None:
        """Divide the outputs of ``source`` by s and multiply the matching input columns of
        ``targets`` by s: the float layer computes the same function, the targets' inputs become
        X diag(1/s) and their statistics follow."""
        module = self.layer.get_submodule(source)
        s = s.to(module.weight.device, torch.float32)
        if isinstance(module, nn.Linear):
            module.weight.data.div_(s[:, None].to(module.weight.dtype))
        else:
            module.weight.data.div_(s.to(module.weight.dtype))
            self.changed.add(f"{source}.weight")
        if getattr(module, "bias", None) is not None:
            module.bias.data.div_(s.to(module.bias.dtype))
            if not isinstance(module, nn.Linear):
                self.changed.add(f"{source}.bias")
        for target in targets:
            weight = self.linears[target].weight
            weight.data.mul_(s[None, :].to(weight.dtype))
            if target in self.original:
                self.original[target].mul_(s[None, :].to(self.original[target].dtype))
        for stats in {id(self.stats[t]): self.stats[t] for t in targets}.values():
            stats.divide_inputs(s.to(stats.absmax.device))


@dataclass(frozen=True)
class Step:
    name: ClassVar[str]
    needs_stats: ClassVar[bool] = False
    needs_gram: ClassVar[bool] = False  # of the statistics, the Gram matrix X^T X
    sequential: ClassVar[bool] = False
    """The statistics come from the inputs that the already quantized earlier layers produce (the
    GPTQ reference's loop); otherwise from the float model's activations (the AWQ, SmoothQuant and
    LQER references calibrate on the unquantized model)."""
    quantizer: ClassVar[bool] = False
    refines: ClassVar[bool] = False

    def relative_cost(self) -> float:
        """The step's run time beyond the calibration pass, in calibration passes (one layer-by-layer
        forward of the calibration set): a rough figure measured on SmolLM2 for scheduling only,
        so that a run starts its longest jobs first."""
        return 0.0

    def inspected_modules(self, arch: Architecture) -> tuple[str, ...]:
        """Submodules of a decoder layer whose calibration inputs the step runs again
        (``LayerContext.module_output``)."""
        return ()

    def shape_problems(self, shapes: ModelShapes) -> list[tuple[str, object, str, str]]:
        """What the step's settings cannot do on a model of these shapes, each as (setting, value,
        what is wrong, what is allowed): the preflight reports them with the config key, one line
        each, before any job runs. A step of one's own overrides this; the built-in steps' checks
        live in ``ptqrepro.checks.preflight``."""
        return []

    @classmethod
    def from_settings(cls, recipe: str, settings: dict) -> "Step":
        known = {f.name for f in fields(cls) if f.init}  # not the ClassVar facts above
        unknown = set(settings) - known
        if unknown:
            raise PtqError(
                f"recipe {recipe!r}: step {cls.name!r} has no setting(s) {', '.join(sorted(unknown))}"
                + (f" (known: {', '.join(sorted(known))})" if known else "")
            )
        hints = typing.get_type_hints(cls)
        for key, value in settings.items():
            allowed = _allowed_types(hints[key])
            if not any(_is_of_type(value, kind) for kind in allowed):
                names = " or ".join("null" if kind is type(None) else getattr(kind, "__name__", str(kind)) for kind in allowed)
                raise PtqError(f"recipe {recipe!r}: step {cls.name!r} setting {key!r} must be {names}, not {value!r}")
        return cls(**settings)

    def apply(self, context: LayerContext) -> None:
        """A transform's work on the whole layer."""
        raise NotImplementedError

    def quantize(self, context: LayerContext, names: tuple[str, ...]) -> None:
        """A quantizer's work on the named linears."""
        raise NotImplementedError

    def refine(self, context: LayerContext, names: tuple[str, ...]) -> None:
        """A refinement's work on the named linears' quantized weights."""
        raise NotImplementedError


STEPS: dict[str, type[Step]] = {}
"""Every registered step by the name a recipe gives it: the built-in ones below, then those that
``register_step`` adds from outside the package (``ptqrepro.recipe.plugins``)."""

STEP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make the ``Step`` subclass ``cls`` a step that recipes name by ``cls.name``
    (see docs/extending.md#bring-your-own-method). A name is letters, digits, ``_`` and ``-`` (a recipe's
    method joins its steps' names with ``+``); registering a second class under a taken name is an
    error, registering the same class again is not."""
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        raise PtqError(f"register_step: {cls!r} is not a subclass of ptqrepro.recipe.steps.Step")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not STEP_NAME.fullmatch(name):
        raise PtqError(f"register_step: {cls.__qualname__}.name must be letters, digits, _ and - (starting with a letter), got {name!r}")
    if sum((cls.quantizer, cls.refines)) > 1:
        raise PtqError(f"register_step: step {name!r} is a quantizer or a refinement, not both")
    taken = STEPS.get(name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise PtqError(f"register_step: step {name!r} is already {taken.__module__}.{taken.__qualname__}")
    STEPS[name] = cls
    return cls


PRECISIONS = ("float32", "bfloat16", "auto")


@dataclass(frozen=True)
class ProductPrecisionStep(Step):
    """A step whose matrix products with the Gram matrix may run in bfloat16: ``precision`` is
    ``float32``, ``bfloat16``, or ``auto`` (bfloat16 where ``compute_dtype("auto")`` picks it for
    the layer's device: CUDA, or a CPU with native bf16 dot products)."""

    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PtqError(f"step {self.name}: precision must be float32, bfloat16 or auto, not {self.precision!r}")

    def product_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the step's matrix products on ``device``."""
        precision = self.precision
        if precision == "auto":
            precision = "bfloat16" if compute_dtype("auto", device.type) == "bfloat16" else "float32"
        return torch_dtype(precision)


@register_step
@dataclass(frozen=True)
class RtnStep(Step):
    """Round-to-nearest every linear (data-free)."""

    name: ClassVar[str] = "rtn"
    quantizer: ClassVar[bool] = True

    def quantize(self, context: LayerContext, names: tuple[str, ...]) -> None:
        for name in names:
            context.quantized[name] = rtn(context.linears[name].weight.data, context.weight_format, context.qualified(name))


@register_step
@dataclass(frozen=True)
class GptqStep(Step):
    """GPTQ on each linear with the Gram matrix of its inputs; ``true_sequential`` re-collects the
    statistics after each of the architecture's sequential groups (q/k/v, o, gate/up, down).
    ``groups`` is how group parameters are fitted (``methods.gptq.GROUP_MODES``): None is the
    reference's way, ``reference``, and ``static`` under ``act_order``, the only mode
    ``act_order`` allows."""

    name: ClassVar[str] = "gptq"
    needs_stats: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = True
    sequential: ClassVar[bool] = True
    quantizer: ClassVar[bool] = True
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    groups: str | None = None
    true_sequential: bool = False

    def __post_init__(self) -> None:
        if self.groups is not None and self.groups not in GROUP_MODES:
            raise PtqError(f"step {self.name}: groups must be one of {', '.join(GROUP_MODES)}, not {self.groups!r}")
        if self.act_order and self.groups not in (None, "static"):
            raise PtqError(
                f"step {self.name}: act_order takes static group parameters (the reference's --act-order "
                f"--static-groups), not groups: {self.groups}"
            )

    @property
    def group_mode(self) -> str:
        """The ``groups`` mode that runs: ``groups``, or its default."""
        return self.groups or ("static" if self.act_order else "reference")

    def relative_cost(self) -> float:
        return 1.0

    def quantize(self, context: LayerContext, names: tuple[str, ...]) -> None:
        for name in names:
            result = gptq(
                context.linears[name].weight.data, context.stats[name].gram, context.weight_format,
                blocksize=self.blocksize, percdamp=self.percdamp, act_order=self.act_order,
                groups=self.group_mode, layer=context.qualified(name),
            )
            context.quantized[name] = result.quantized
            context.note(name, damping=result.damping, cholesky_retries=result.retries, dead_columns=result.dead_columns)


@register_step
@dataclass(frozen=True)
class SmoothQuantStep(Step):
    """Fold SmoothQuant's scales into each (norm -> linears) pair of the layer."""

    name: ClassVar[str] = "smoothquant"
    needs_stats: ClassVar[bool] = True
    alpha: float = 0.5

    def relative_cost(self) -> float:
        return 0.2

    def apply(self, context: LayerContext) -> None:
        for norm, targets in context.arch.smooth_pairs:
            weights = [context.linears[t].weight.data for t in targets]
            s = smoothing_scales(context.stats[targets[0]].absmax, weights, self.alpha)
            context.fold_scale(norm, targets, s)


AWQ_LOSSES = ("block", "linears")
"""AWQ's scale-search losses (``methods.awq``): the reference's inspected-module MSE, or the sum of
the linears' output errors."""


@register_step
@dataclass(frozen=True)
class AwqStep(ProductPrecisionStep):
    """AWQ's scale search over the layer's scaling groups, folded in, then its clip search. The
    scale search ranks by ``loss``: ``block`` (the reference's MSE of the module it inspects, run
    on the calibration inputs in the calibration dtype) or ``linears``; the output errors
    tr(D G D^T) of the ``linears`` loss and of the clip search are computed in ``precision``."""

    name: ClassVar[str] = "awq"
    needs_stats: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = True
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    loss: str = "block"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in AWQ_LOSSES:
            raise PtqError(f"step {self.name}: loss must be one of {', '.join(AWQ_LOSSES)}, not {self.loss!r}")

    def relative_cost(self) -> float:
        """The block loss runs the attention and MLP blocks once per candidate: 3.5x the time per
        layer on SmolLM2 (25 s against 7 s, 20 candidates)."""
        return 2.0 + (self.n_grid / 4 if self.loss == "block" else 0.0)

    def inspected_modules(self, arch: Architecture) -> tuple[str, ...]:
        return tuple(module for _, module in arch.inspected) if self.loss == "block" else ()

    def apply(self, context: LayerContext) -> None:
        inspected = dict(context.arch.inspected) if self.loss == "block" else {}
        for source, targets in context.arch.scale_pairs:
            module = context.layer.get_submodule(source)
            if isinstance(module, nn.Linear) and module.out_features != context.linears[targets[0]].in_features:
                continue  # e.g. v_proj -> o_proj under grouped-query attention
            stats = context.stats[targets[0]]
            weights = [context.linears[t].weight.data for t in targets]
            block = None
            if source in inspected:
                block = partial(_group_output, context, inspected[source], targets)
            s, losses = search_scales(weights, stats.gram, stats.absmean, context.fake_quantize, self.n_grid,
                                      self.product_dtype(weights[0].device), block)
            context.fold_scale(source, targets, s)
            for target in targets:
                context.note(target, awq_ratio=losses.index(min(losses)) / self.n_grid)
        if not self.clip:
            return
        for name, linear in context.linears.items():
            if name in context.arch.clip_skip:
                continue
            weight = linear.weight.data
            length = context.weight_format.group_length(weight.shape[1])
            threshold = search_clip(weight, context.stats[name].gram, length, context.fake_quantize, self.n_grid,
                                    self.max_shrink, self.product_dtype(weight.device))
            weight.copy_(apply_clip(weight, threshold))


def _group_output(context: LayerContext, module: str, targets: tuple[str, ...], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The output of ``module`` with the scaling group's linears ``targets`` given ``weights``."""
    return context.module_output(module, dict(zip(targets, weights, strict=True)))


@register_step
@dataclass(frozen=True)
class MagrStep(ProductPrecisionStep):
    """MagR (Zhang et al., NeurIPS 2024, Algorithm 1): shrink each row's (or each group's) largest
    magnitudes at a small output error before quantization. ``group_size`` None follows the
    weight format (per-channel for ``int3``, groups of 128 for ``int3-g128``); ``alpha`` None is the
    paper's 1e-3 per channel, 1e-4 per group (§5 "The choice of parameters"). ``precision`` is the
    dtype of the products ``D Ĝ`` (``magr``'s ``product_dtype``)."""

    name: ClassVar[str] = "magr"
    needs_stats: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = True
    sequential: ClassVar[bool] = True
    alpha: float | None = None
    iterations: int = 150
    group_size: int | None = None

    def relative_cost(self) -> float:
        return self.iterations / 15

    def apply(self, context: LayerContext) -> None:
        for name, linear in context.linears.items():
            weight = linear.weight.data
            group = self.group_size or context.weight_format.group_length(weight.shape[1])
            alpha = self.alpha if self.alpha is not None else (1e-4 if group else 1e-3)
            started = time.perf_counter()
            gram = context.stats[name].gram
            product_dtype = self.product_dtype(weight.device)
            result = magr(weight, gram, alpha=alpha, iterations=self.iterations, group_size=group,
                          layer=context.qualified(name), product_dtype=product_dtype)
            context.note(
                name, magr_max_abs_before=float(weight.abs().max()), magr_max_abs_after=float(result.weight.abs().max()),
                magr_row_max_quantiles_before=row_max_quantiles(weight), magr_row_max_quantiles_after=row_max_quantiles(result.weight),
                magr_output_rel_error=relative_output_error(weight, result.weight, gram), magr_iterations=result.iterations,
                magr_alpha=alpha, magr_products=str(product_dtype).removeprefix("torch."),
                magr_time_s=round(time.perf_counter() - started, 3),
            )
            weight.copy_(result.weight.to(weight.dtype))


ROW_MAX_QUANTILES = 11
"""Quantiles (0 %, 10 %, ..., 100 %) of the per-output-channel max|W| that MagR's record keeps."""


def row_max_quantiles(weight: torch.Tensor) -> list[float]:
    """The ``ROW_MAX_QUANTILES`` quantiles over output channels (rows) of max_j |W_ij|, 4 significant
    digits: the distribution MagR reshapes, small enough to record for every linear."""
    levels = torch.linspace(0, 1, ROW_MAX_QUANTILES, dtype=torch.float64)
    quantiles = torch.quantile(weight.detach().abs().amax(dim=1).double().cpu(), levels)
    return [float(f"{value:.4g}") for value in quantiles.tolist()]


@register_step
@dataclass(frozen=True)
class CoordinateDescentStep(Step):
    """Coordinate-descent sweeps on the quantizer's codes with its grid fixed, towards the layer's
    original float output (MagR's OPTQ†: 30 sweeps on top of GPTQ for per-channel INT2)."""

    name: ClassVar[str] = "cd"
    needs_stats: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = True
    sequential: ClassVar[bool] = True
    refines: ClassVar[bool] = True
    sweeps: int = 30
    damping: float = 0.75

    def relative_cost(self) -> float:
        return self.sweeps / 10

    def refine(self, context: LayerContext, names: tuple[str, ...]) -> None:
        for name in names:
            context.quantized[name] = coordinate_descent(
                context.original[name], context.quantized[name], context.stats[name].gram,
                sweeps=self.sweeps, damping=self.damping,
            )
            context.note(name, cd_sweeps=self.sweeps)


@register_step
@dataclass(frozen=True)
class LqerStep(Step):
    """LQER: a rank-``rank`` correction of each linear's quantization error ``W - Q(W)`` (truncated
    SVD), stored in ``factor_format`` (MXINT8 in the paper) and added at inference."""

    name: ClassVar[str] = "lqer"
    refines: ClassVar[bool] = True
    rank: int = 32
    factor_format: str = "mxint8"

    def relative_cost(self) -> float:
        return 0.2

    def __post_init__(self) -> None:
        if parse_format(self.factor_format) is None:
            raise PtqError(f"step {self.name}: factor_format must be a quantized format, not {self.factor_format!r}")

    def scale(self, context: LayerContext, name: str) -> torch.Tensor | None:
        return None

    def refine(self, context: LayerContext, names: tuple[str, ...]) -> None:
        fmt = parse_format(self.factor_format)
        for name in names:
            weight = context.linears[name].weight.data.float()
            error = weight - context.quantized[name].dequantize().to(weight.device)
            correction = low_rank_correction(error, self.rank, self.scale(context, name))
            term = quantize_low_rank(correction.a, correction.b, fmt, context.qualified(name))
            context.corrections[name] = term
            residual = error - term.weight_delta().to(error.device)
            context.note(name, lqer_rank=self.rank, lqer_residual_rel_error=float(residual.norm() / error.norm().clamp(min=1e-30)))


@register_step
@dataclass(frozen=True)
class L2qerStep(LqerStep):
    """L2QER: LQER on ``S E`` with S the normalised calibration activation magnitudes, undone in A."""

    name: ClassVar[str] = "l2qer"
    needs_stats: ClassVar[bool] = True

    def scale(self, context: LayerContext, name: str) -> torch.Tensor:
        return activation_scale(context.stats[name].batch_absmean_max)


BUILTIN_STEPS = frozenset(STEPS)
"""The steps this package defines."""
