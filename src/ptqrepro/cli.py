"""The ``ptqrepro`` command: one subcommand per pipeline stage, each usable by hand
(``ptqrepro COMMAND -h``: its options with their defaults, and an example).

    ptqrepro prepare-model   --name M --spec '{gguf: {...}}' --out results/models/M
    ptqrepro prepare-corpus  --name C [--spec '{path: ...}'] --out results/corpora/C
    ptqrepro calibrate       --model DIR --corpus DIR --nsamples N --seqlen L --seed S [--tokenizer slow] --out FILE.pt
    ptqrepro quantize        --model DIR [--calibration FILE.pt] --recipe NAME --spec '{steps: [rtn], weight: int4}' [--offload cpu] --out DIR --metrics FILE.json
    ptqrepro dwr             --model DIR --calibration FILE.pt --base DIR --recipe NAME --spec '{base: B, dwr: {ranks: [16]}}' --out DIR --metrics FILE.json
    ptqrepro eval-ppl        --model DIR --quantized DIR --corpus DIR --seqlen L [--max-windows K] [--tokenizer slow] [--reference FILE] [--placement layers] --out FILE.json
    ptqrepro float-reference --model DIR --corpus DIR --seqlen L [--max-windows K] [--tokenizer slow] --top-k K --out FILE.safetensors
    ptqrepro zeroshot-tasks  --corpus DIR --items N --seed S --out DIR
    ptqrepro eval-zeroshot   --model DIR --quantized DIR --tasks T... [--include DIR] [--staged FILE.json] [--num-fewshot K] [--metric T=acc_norm...] [--backend vllm --exported DIR] --out-dir DIR
    ptqrepro stage-tasks     --tasks T... [--metric T=acc_norm...] --out FILE.json
    ptqrepro export          --model DIR --quantized DIR --format compressed-tensors|dequantized [--drop-activation-quantization] [--target vllm-cpu] --out DIR
    ptqrepro vllm-check      --exported DIR --result JSON --corpus DIR [--vllm-python PY] [--windows N] --out TABLE.md
    ptqrepro tables          --out DIR [--bootstrap-samples B --bootstrap-seed S --level 0.95] [--averages '{avg: {task: acc}}'] RESULT.json...
    ptqrepro agreement       --ours DIR --peer DIR --out FILE.json
    ptqrepro peers           --out DIR [--bootstrap-samples B ...] RESULT.json...
    ptqrepro plots           --table all.csv [--figure F] | --dwr quantize.json | --magr quantize.json --out STEM
    ptqrepro paper-tables    --table all.csv --reference config/reference/magr.csv... --out DIR
    ptqrepro compare         --windows A/windows.csv B/windows.csv [--labels A B] --out DIR
    ptqrepro compare-claims  --runs A B --config CONFIG.yaml --out DIR
    ptqrepro claims          --table all.csv --windows windows.csv --claims '[{paper: ..., claim: ..., below: [A, B]}]' --out DIR

Bad input ends with one line ``ptqrepro: error: ...``, exit code 2 for a bad argument and 1 for a
missing, empty or corrupt input, found before the work where it can be; an interrupt (SIGINT,
SIGTERM) ends with one line and exit code 130. Nothing already written is touched and nothing is
left half-written, since every output is written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import pickle
import signal
import sys
import threading
from pathlib import Path

import torch

from ptqrepro import __version__
from ptqrepro.errors import InputError, PtqError, first_line
from ptqrepro.runtime.io import atomic_path, check_writable, load_yaml, read_json, write_json
from ptqrepro.data.corpora import CORPUS_MANIFEST
from ptqrepro.data.corpora import prepared_corpus as _corpus
from ptqrepro.data.corpora import prepared_documents as _documents
from ptqrepro.models.sources import TOKENIZERS
from ptqrepro.layerwise.placement import OFFLOADS, PLACEMENTS, check_offload
from ptqrepro.report.result_format import (
    AGREEMENT_KIND,
    CALIBRATION_KEYS,
    MEASUREMENT_KEYS,
    PERPLEXITY_KIND,
    QUANTIZE_KIND,
    RECIPE_KEYS,
    UNCALIBRATED,
    ZEROSHOT_KIND,
)

TASKS_SOURCE = "source.json"
"""What a local zero-shot task folder records of the corpus it was drawn from (its name and revision)."""


def _spec(text: str | None) -> dict:
    """Parse an inline YAML/JSON mapping given on the command line."""
    if not text:
        return {}
    value = load_yaml(text, "--spec")
    if not isinstance(value, dict):
        raise PtqError(f"--spec must be a mapping, got {text!r}")
    return value


def _set_threads(threads: int | None) -> None:
    """One size for each thread pool a job computes with: torch's and the BLAS that SciPy loads
    (``statistics.add_gram_syrk``), which would otherwise start one thread per core."""
    if threads:
        import scipy.linalg.blas  # noqa: F401  (loaded first, so that the limit reaches it)
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        threadpool_limits(threads, user_api="blas")


def _load_calibration(path: str) -> dict:
    """The calibration windows ``calibrate`` wrote: ``{input_ids [windows, seqlen] token ids, corpus,
    seed}``; an empty, corrupt or different file is a ``PtqError``."""
    try:
        calibration = torch.load(path)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        raise InputError(f"--calibration {path}: cannot read it ({type(error).__name__}: {first_line(error)})") from None
    ids = calibration.get("input_ids") if isinstance(calibration, dict) else None
    if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not ids.numel() or ids.is_floating_point()
            or not {"corpus", "seed"} <= set(calibration)):
        raise InputError(f"--calibration {path}: not a file of `ptqrepro calibrate` "
                       "(expected input_ids [windows, seqlen] of token ids, corpus and seed)")
    return calibration


def _corpus_revision(corpus_dir: str) -> str | None:
    """The hub commit a prepared corpus was read at (None: a local source, or prepared before it was recorded)."""
    return read_json(Path(corpus_dir) / CORPUS_MANIFEST).get("revision")


def _revisions(model_dir: str, dataset_revision: str | None, tokenizer_class: str | None) -> dict:
    """What a result records of the exact inputs it was computed from: the hub commit of its model
    and of its dataset (None: a local folder or file) and the tokenizer class that tokenized the text."""
    from ptqrepro.models.sources import model_revision

    return {"model_revision": model_revision(model_dir), "dataset_revision": dataset_revision,
            "tokenizer_class": tokenizer_class}


def _read_json(path: str, option: str) -> dict:
    """A JSON object that an argument names; a file that is not one is an ``InputError``."""
    try:
        value = read_json(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{option} {path}: not a JSON file ({first_line(error)})") from None
    if not isinstance(value, dict):
        raise InputError(f"{option} {path}: not a result JSON of ptqrepro (a {type(value).__name__}, not an object)")
    return value


def _read_table(path: str, option: str, columns: tuple[str, ...], made_by: str):
    """The CSV table an argument names, with at least ``columns``; an empty, malformed or other table
    is an ``InputError`` naming the argument (never pandas' own error)."""
    import pandas

    try:
        table = pandas.read_csv(path)
    except (pandas.errors.EmptyDataError, pandas.errors.ParserError, UnicodeDecodeError) as error:
        raise InputError(f"{option} {path}: not a CSV table ({first_line(error)})") from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise InputError(f"{option} {path}: not {made_by} (no column {', '.join(missing)})")
    return table


def _summary_table(path: str, option: str = "--table"):
    """``all.csv`` of ``ptqrepro tables``, by the columns that name and hold a measurement."""
    return _read_table(path, option, (*RECIPE_KEYS, *MEASUREMENT_KEYS, "metric", "value"), "all.csv of `ptqrepro tables`")


def _windows_table(path: str, option: str = "--windows"):
    """``windows.csv`` of ``ptqrepro tables``."""
    from ptqrepro.report.tables import WINDOW_COLUMNS

    return _read_table(path, option, WINDOW_COLUMNS, "windows.csv of `ptqrepro tables`")


def cmd_prepare_model(args) -> None:
    from ptqrepro.models.sources import ModelSource, prepare_model
    from ptqrepro.checks.preflight import model_source_problem

    source = ModelSource.from_config(args.name, _spec(args.spec))
    problem = model_source_problem(source)
    if problem:
        raise InputError(f"--spec: model {args.name!r}: {problem}")
    check_writable(args.out, "--out", folder=True)
    manifest = prepare_model(source, args.out)
    print(json.dumps(manifest))


def cmd_prepare_corpus(args) -> None:
    from ptqrepro.data.corpora import corpus_revision, corpus_spec, write_corpus

    spec = corpus_spec(args.name, _spec(args.spec) or None)
    check_writable(args.out, "--out", folder=True)
    with atomic_path(args.out) as tmp:
        stats = write_corpus(spec, tmp)
        write_json(tmp / CORPUS_MANIFEST, {"spec": dataclasses.asdict(spec), "stats": stats, "revision": corpus_revision(spec)})
    print(json.dumps(stats))


def cmd_calibrate(args) -> None:
    """The calibration windows, with their seed, or None where the protocol draws nothing (LQER's
    chunks): every seed gives the same windows, so its results carry no seed and rest on no draw."""
    from ptqrepro.data.windows import calibration_is_drawn, calibration_windows
    from ptqrepro.models.sources import load_tokenizer

    spec = _corpus(args.corpus)
    check_writable(args.out, "--out")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    windows = calibration_windows(_documents(args.corpus, "train"), tokenizer, spec, args.nsamples, args.seqlen, args.seed)
    revisions = _revisions(args.model, _corpus_revision(args.corpus), type(tokenizer).__name__)
    with atomic_path(args.out) as tmp:
        seed = args.seed if calibration_is_drawn(spec) else None
        torch.save({"input_ids": windows, "corpus": spec.name, "seed": seed, "tokenizer": args.tokenizer,
                    **revisions}, tmp)
    print(f"{tuple(windows.shape)} calibration windows from {spec.name} -> {args.out}")


@contextlib.contextmanager
def _checkpoints(folder: str | None, settings: dict):
    """The job's per-layer checkpoints in ``folder`` (None: no checkpoints), fingerprinted by its
    settings, the code's git commit and torch's version; the folder is locked for the block (another
    job holding it: a ``PtqError``)."""
    if folder is None:
        yield None
        return
    from ptqrepro.layerwise.checkpoint import LayerCheckpoints
    from ptqrepro.runtime.provenance import config_hash, git_commit

    fingerprint = config_hash({"settings": settings, "commit": git_commit(), "torch": torch.__version__})
    with LayerCheckpoints(folder, fingerprint, log=print) as checkpoints:
        yield checkpoints


def cmd_quantize(args) -> None:
    from ptqrepro.export.artifact import BASE_MODEL, model_fingerprint, save_artifact
    from ptqrepro.models.sources import compute_dtype, load_model, require_finite_weights, resolve_device, torch_dtype
    from ptqrepro.layerwise.pipeline import quantize_model
    from ptqrepro.runtime.provenance import Provenance
    from ptqrepro.peers.recipes import is_peer
    from ptqrepro.recipe.recipes import recipe_from_config

    _set_threads(args.threads)
    provenance = Provenance()
    check_offload(args.offload)
    spec = _spec(args.spec)
    if is_peer(spec):
        return _quantize_with_peer(args, spec, provenance)
    recipe = recipe_from_config(args.recipe, spec)
    if recipe.needs_stats and not args.calibration:
        raise PtqError(f"recipe {args.recipe!r} calibrates (a step reads activation statistics): give --calibration")
    _check_outputs(args)
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    given = _load_calibration(args.calibration) if args.calibration else None
    calibration = given if recipe.needs_stats else None
    settings = _quantize_settings(args, spec, calibration, dtype)
    with _checkpoints(args.checkpoint_dir, settings) as checkpoints:
        model, _ = load_model(args.model, dtype="auto")
        require_finite_weights(model, args.model)
        base_model = model_fingerprint(model)
        result = quantize_model(
            model, recipe, calibration["input_ids"] if calibration else None, device=device, batch_size=args.batch_size, log=print,
            dtype=torch_dtype(dtype), checkpoints=checkpoints, offload=args.offload, release_layers=True,
        )
        description = _recipe_description(recipe, settings, result)
        record = {**provenance.record(settings, device), "offload": args.offload, **_calibration_revisions(args.model, calibration)}
        errors = [r["weight_rel_error"] for r in result.records]
        metrics = {
            "quantize_time_s": record["wall_time_s"],
            "bits_per_weight": description["bits_per_weight"],
            "mean_weight_rel_error": sum(errors) / len(errors) if errors else 0.0,
        }
        if any("cholesky_retries" in r for r in result.records):
            metrics["cholesky_retries"] = sum(r.get("cholesky_retries", 0) for r in result.records)
        if result.records and "lqer_rank" in result.records[0]:
            metrics["lqer_rank"] = result.records[0]["lqer_rank"]
        if result.records and "output_rel_error" in result.records[0]:
            metrics["mean_output_rel_error"] = sum(r["output_rel_error"] for r in result.records) / len(result.records)
        save_artifact(args.out, result.quantized, result.float_parameters,
                      {**description, "config_hash": record["config_hash"], BASE_MODEL: base_model}, corrections=result.corrections)
        write_json(args.metrics, {
            "kind": QUANTIZE_KIND, **description, "dataset": calibration["corpus"] if calibration else UNCALIBRATED,
            "metrics": metrics, "settings": settings, "provenance": record, "layers": result.records,
        })
        if checkpoints is not None:
            checkpoints.remove()
    print(f"{recipe.name}: {len(result.quantized)} linears, {description['bits_per_weight']} bits/weight")


def _calibration_revisions(model_dir: str, calibration: dict | None) -> dict:
    """``_revisions`` of a quantize or DWR job: its model's, and the calibration corpus's and tokenizer
    class that ``calibrate`` recorded (None where the recipe reads no calibration data, or in files
    written before it recorded them)."""
    calibration = calibration or {}
    return _revisions(model_dir, calibration.get("dataset_revision"), calibration.get("tokenizer_class"))


def _quantize_settings(args, spec: dict, calibration: dict | None, dtype: str) -> dict:
    """What a quantize job's result depends on (its provenance's config hash, its checkpoints'
    fingerprint): the calibration windows and their dtype only where the recipe reads them
    (``calibration`` None: it does not)."""
    if calibration is None:
        return {"model": Path(args.model).name, "recipe": spec}
    return {"model": Path(args.model).name, "recipe": spec, "calibration": calibration["corpus"], "seed": calibration["seed"],
            "nsamples": int(calibration["input_ids"].shape[0]), "seqlen": int(calibration["input_ids"].shape[1]),
            "dtype": dtype}


def _recipe_description(recipe, settings: dict, result) -> dict:
    """The fields that name a quantized model in every result of it (``tables`` reads them)."""
    fmt = recipe.weight
    return {
        "model": settings["model"],
        "recipe": recipe.name,
        "method": recipe.method,
        "weight_format": fmt.name if fmt else None,
        "weight_scheme": (fmt.scheme if fmt else "fp16") + (f" a={recipe.act.name}" if recipe.act else ""),
        "weight_bits": fmt.bits if fmt else 16,
        "bits_per_weight": result.bits_per_weight() or 16,
        "act_format": recipe.act.name if recipe.act else None,
        # None where the recipe reads no calibration data: the same model at every seed (and dtype)
        "calibration_seed": settings["seed"] if recipe.needs_stats else None,
        "calibration_dtype": settings["dtype"] if recipe.needs_stats else None,
    }


def _quantize_with_peer(args, spec: dict, provenance) -> None:
    """A peer recipe's quantize job: the toolkit quantizes the model loaded in float32 (on the CPU,
    or on CUDA where the toolkit moves it), our artifact and result JSON as for our recipes, plus
    the toolkit, its version and how it differs from ours (``ptqrepro.peers``). No per-layer
    checkpoints: a killed job starts over."""
    from ptqrepro.export.artifact import BASE_MODEL, model_fingerprint, save_artifact
    from ptqrepro.models.sources import load_model, require_finite_weights, resolve_device
    from ptqrepro.peers import toolkit
    from ptqrepro.peers.recipes import peer_from_spec

    peer = peer_from_spec(args.recipe, spec)
    kit = toolkit(peer.toolkit)
    missing = kit.missing()
    if missing:
        raise PtqError(f"recipe {args.recipe!r}: {missing}")
    if not args.calibration:
        raise PtqError(f"recipe {args.recipe!r}: a peer toolkit calibrates: give --calibration")
    _check_outputs(args)
    device = resolve_device(args.device)
    calibration = _load_calibration(args.calibration)
    settings = _quantize_settings(args, spec, calibration, "float32")
    model, _ = load_model(args.model, dtype="float32")
    require_finite_weights(model, args.model)
    base_model = model_fingerprint(model)
    outcome = kit.translator().quantize(model, peer.mirrors, calibration["input_ids"])
    recipe = dataclasses.replace(peer.mirrors, name=peer.name)
    description = {**_recipe_description(recipe, settings, outcome.result), "toolkit": kit.name,
                   "toolkit_version": kit.version(), "mirrors": peer.mirrors.name}
    record = {**provenance.record(settings, device), "offload": args.offload, **_calibration_revisions(args.model, calibration)}
    metrics = {"quantize_time_s": record["wall_time_s"], "toolkit_time_s": round(outcome.seconds, 3),
               "bits_per_weight": description["bits_per_weight"]}
    save_artifact(args.out, outcome.result.quantized, outcome.result.float_parameters,
                  {**description, "config_hash": record["config_hash"], BASE_MODEL: base_model})
    write_json(args.metrics, {
        "kind": QUANTIZE_KIND, **description, "dataset": calibration["corpus"], "metrics": metrics,
        "differences": outcome.differences, "settings": settings, "provenance": record, "layers": [],
    })
    print(f"{peer.name}: {len(outcome.result.quantized)} linears by {kit.name} {kit.version()}")


def cmd_dwr(args) -> None:
    from ptqrepro.export.artifact import BASE_MODEL, check_fits, load_artifact, model_fingerprint, save_artifact
    from ptqrepro.models.sources import compute_dtype, load_model, require_finite_weights, resolve_device, torch_dtype
    from ptqrepro.runtime.provenance import Provenance
    from ptqrepro.layerwise.reconstruction import search_model
    from ptqrepro.recipe.recipes import reconstruction_from_config

    _set_threads(args.threads)
    provenance = Provenance()
    check_offload(args.offload)
    spec = _spec(args.spec)
    base = load_artifact(args.base)
    recipe = reconstruction_from_config(args.recipe, spec)
    _check_outputs(args)
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    calibration = _load_calibration(args.calibration)
    description = {**{key: base.manifest[key] for key in RECIPE_KEYS if key not in ("recipe", "method")},
        "recipe": recipe.name, "method": f"{base.manifest['method']}+dwr", "calibration_seed": calibration["seed"],
        "calibration_dtype": dtype}
    settings = {"model": description["model"], "recipe": spec, "base": base.manifest["config_hash"],
                "calibration": calibration["corpus"], "seed": calibration["seed"], "dwr_seed": recipe.settings.seed,
                "windows": int(calibration["input_ids"][: recipe.settings.windows].shape[0]),
                "seqlen": int(calibration["input_ids"].shape[1]), "dtype": dtype}
    with _checkpoints(args.checkpoint_dir, settings) as checkpoints:
        model, _ = load_model(args.model, dtype="auto")
        require_finite_weights(model, args.model)
        check_fits(model, base, args.base, args.model)
        base_model = model_fingerprint(model)
        result = search_model(model, base, calibration["input_ids"], recipe.settings, device=device,
                              batch_size=args.batch_size, log=print, dtype=torch_dtype(dtype), checkpoints=checkpoints,
                              offload=args.offload)
        record = {**provenance.record(settings, device), "offload": args.offload, **_calibration_revisions(args.model, calibration)}
        changed = sum(1 for block in result.blocks if block.chosen)
        save_artifact(args.out, result.quantized, base.float_parameters,
                      {**description, "config_hash": record["config_hash"], BASE_MODEL: base_model}, corrections=base.corrections)
        write_json(args.metrics, {
            "kind": QUANTIZE_KIND, **description, "dataset": calibration["corpus"],
            "metrics": {"quantize_time_s": record["wall_time_s"], "bits_per_weight": description["bits_per_weight"],
                        "calibration_ppl_before": result.initial_ppl, "calibration_ppl_after": result.final_ppl,
                        "blocks_changed": changed},
            "settings": settings, "provenance": record,
            "dwr": [{"layer": b.layer, "chosen_rank": b.chosen, "curve": {str(k): p for k, p in b.curve.items()},
                     "seconds": b.seconds} for b in result.blocks],
        })
        if checkpoints is not None:
            checkpoints.remove()
    print(f"{recipe.name}: calibration ppl {result.initial_ppl:.4f} -> {result.final_ppl:.4f}, "
          f"{changed}/{len(result.blocks)} blocks changed")


def _result_description(manifest: dict) -> dict:
    """What an evaluation result repeats of its artifact's manifest: ``RECIPE_KEYS`` and
    ``CALIBRATION_KEYS`` (``report.result_format``)."""
    return {**{key: manifest[key] for key in RECIPE_KEYS}, **{key: manifest.get(key) for key in CALIBRATION_KEYS}}


@contextlib.contextmanager
def _model_to_evaluate(args):
    """The quantized model of ``--model`` + ``--quantized`` in the evaluation dtype, computing on
    ``--device`` as ``--placement`` puts it there (``placement.placed_for_evaluation``): inside the
    block, ``(model, tokenizer, manifest, device, dtype name, placement chosen)``. The model loads
    in the evaluation dtype (lazily where that is the checkpoint's), so the host holds it once."""
    from ptqrepro.export.artifact import apply_artifact
    from ptqrepro.models.sources import compute_dtype, load_model, require_finite_weights, resolve_device
    from ptqrepro.layerwise.placement import placed_for_evaluation

    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    model, tokenizer = load_model(args.model, dtype)
    manifest = apply_artifact(model, args.quantized, device, model_dir=args.model)
    require_finite_weights(model, f"{args.model} with {args.quantized}")
    with placed_for_evaluation(model, device, args.placement) as placement:
        yield model, tokenizer, manifest, device, dtype, placement


def cmd_eval_ppl(args) -> None:
    from ptqrepro.data.windows import evaluation_windows
    from ptqrepro.eval.divergence import FloatReference
    from ptqrepro.eval.perplexity import perplexity, windows_fingerprint
    from ptqrepro.models.sources import load_tokenizer
    from ptqrepro.runtime.provenance import Provenance

    _set_threads(args.threads)
    provenance = Provenance()
    spec = _corpus(args.corpus)
    check_writable(args.out, "--out")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    reference = FloatReference.load(args.reference) if args.reference else None
    with _model_to_evaluate(args) as (model, _, manifest, device, dtype, placement):
        windows, total = evaluation_windows(
            _documents(args.corpus, "test"), tokenizer, spec, args.seqlen, args.max_windows,
            nsamples=args.nsamples, seed=args.seed,
        )
        if reference is not None:
            reference.check_windows(windows_fingerprint(windows), args.reference)
        metrics, per_window = perplexity(model, windows, batch_size=args.batch_size, device=device, reference=reference)
    protocol = {"seqlen": args.seqlen, "windows": int(windows.shape[0]), "total_windows": total,
                "max_windows": args.max_windows, "dtype": dtype, "sampling": spec.sampling, "split": "test",
                "seed": args.seed, "tokenizer": args.tokenizer, "tokenizer_class": type(tokenizer).__name__,
                "windows_sha256": windows_fingerprint(windows), "kld_top_k": reference.k if reference is not None else None}
    description = _result_description(manifest)
    write_json(args.out, {
        "kind": PERPLEXITY_KIND, **description, "dataset": spec.name, "metrics": metrics, "protocol": protocol,
        **per_window,
        "provenance": {**provenance.record({"protocol": protocol, "quantized": manifest["config_hash"]}, device),
                       "placement": placement,
                       **_revisions(args.model, _corpus_revision(args.corpus), type(tokenizer).__name__)},
    })
    print(f"{description['recipe']} on {spec.name}: ppl {metrics['ppl']:.3f} over {windows.shape[0]} windows")


def cmd_float_reference(args) -> None:
    """The float model's top-k next-token log-probabilities on the evaluation windows, once per
    model, dataset and protocol, for the KL and flips of every eval-ppl (``eval.divergence``)."""
    from ptqrepro.data.windows import evaluation_windows
    from ptqrepro.eval.divergence import float_reference
    from ptqrepro.eval.perplexity import windows_fingerprint
    from ptqrepro.models.sources import compute_dtype, load_model, load_tokenizer, require_finite_weights, resolve_device
    from ptqrepro.layerwise.placement import placed_for_evaluation

    _set_threads(args.threads)
    spec = _corpus(args.corpus)
    check_writable(args.out, "--out")
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    model, _ = load_model(args.model, dtype)
    require_finite_weights(model, args.model)
    windows, _ = evaluation_windows(_documents(args.corpus, "test"), tokenizer, spec, args.seqlen, args.max_windows,
                                    nsamples=args.nsamples, seed=args.seed)
    with placed_for_evaluation(model, device, args.placement):
        reference = float_reference(model, windows, args.top_k, args.batch_size, device, windows_fingerprint(windows))
    with atomic_path(args.out) as tmp:
        reference.save(tmp, {"model": Path(args.model).name, "dataset": spec.name, "seqlen": args.seqlen, "dtype": dtype,
                             "top_k": reference.k})
    print(f"float top-{reference.k} of {spec.name}: {tuple(reference.ids.shape[:2])} positions -> {args.out}")


def cmd_zeroshot_tasks(args) -> None:
    from ptqrepro.eval.zeroshot import write_local_tasks

    _corpus(args.corpus)
    check_writable(args.out, "--out", folder=True)
    with atomic_path(args.out) as tmp:
        written = write_local_tasks(_documents(args.corpus, "test"), tmp, args.items, args.seed, located_at=args.out)
        write_json(tmp / TASKS_SOURCE, {"corpus": _corpus(args.corpus).name, "revision": _corpus_revision(args.corpus)})
    print(json.dumps(written))


def _task_metrics(pairs: list[str], tasks: list[str]) -> dict[str, str]:
    """``--metric TASK=METRIC`` pairs as ``{task: metric}``; every task of ``tasks`` not named: acc."""
    chosen = {}
    for pair in pairs or []:
        task, _, metric = pair.partition("=")
        if task not in tasks or metric not in ("acc", "acc_norm"):
            raise PtqError(f"--metric {pair}: give TASK=acc or TASK=acc_norm for a task of --tasks")
        chosen[task] = metric
    return {task: chosen.get(task, "acc") for task in tasks}


def cmd_stage_tasks(args) -> None:
    from ptqrepro.eval.zeroshot import check_metrics, stage_tasks

    check_writable(args.out, "--out")
    staged = stage_tasks(args.tasks)
    check_metrics(staged["tasks"], _task_metrics(args.metric, args.tasks))
    write_json(args.out, staged)
    print(f"staged {len(staged['tasks'])} hub task(s) with lm-eval {staged['lm_eval']}: {' '.join(staged['tasks'])}")


def cmd_eval_zeroshot(args) -> None:
    from ptqrepro.eval.zeroshot import (
        HARNESS_SETTINGS,
        LOCAL_TASKS,
        check_metrics,
        evaluate_zeroshot,
        lm_eval_version,
        load_tasks,
        task_record,
        write_items,
    )
    from ptqrepro.runtime.provenance import Provenance

    _set_threads(args.threads)
    provenance = Provenance()
    check_writable(Path(args.out_dir) / "zeroshot.json", "--out-dir")
    metrics_of = _task_metrics(args.metric, args.tasks)
    if args.staged:
        staged = read_json(args.staged)
        if staged["lm_eval"] != lm_eval_version():
            raise PtqError(f"{args.staged}: staged with lm-eval {staged['lm_eval']}, this job has {lm_eval_version()}: stage the tasks again")
    loaded = load_tasks(args.tasks, args.include)  # before the model: a task without its data fails at once
    records = {task: task_record(built) for task, built in loaded[1].items()}
    check_metrics(records, metrics_of)
    if args.staged:
        moved = [f"{task} ({staged['tasks'][task]['dataset_revision']} staged, {record['dataset_revision']} here)"
                 for task, record in records.items() if task in staged["tasks"]
                 and None not in (staged["tasks"][task]["dataset_revision"], record["dataset_revision"])
                 and staged["tasks"][task]["dataset_revision"] != record["dataset_revision"]]
        if moved:
            raise PtqError(f"{args.staged}: the cached datasets changed since staging: {', '.join(moved)}; stage the tasks again")
    if args.backend == "vllm":
        results, manifest, ran, tokenizer_class = _zeroshot_in_vllm(args, records)
        device, dtype, placement = "cpu", ran["dtype"], None
    else:
        with _model_to_evaluate(args) as (model, tokenizer, manifest, device, dtype, placement):
            results = evaluate_zeroshot(model, tokenizer, args.tasks, args.include, args.batch_size, args.max_length,
                                        device, args.limit, args.num_fewshot, loaded)
        ran, tokenizer_class = {"backend": "hf"}, type(tokenizer).__name__
    source = Path(args.include or "") / TASKS_SOURCE
    local_revision = read_json(source).get("revision") if args.include and source.is_file() else None
    description = _result_description(manifest)
    protocol = {"batch_size": args.batch_size, "max_length": args.max_length, "limit": args.limit, "dtype": dtype,
                "num_fewshot": args.num_fewshot, **HARNESS_SETTINGS, "backend": ran["backend"]}
    for task, result in results.items():
        items = Path(args.out_dir) / f"zeroshot-{task}.items.csv"
        with atomic_path(items) as tmp:
            write_items(tmp, result.items)
        write_json(Path(args.out_dir) / f"zeroshot-{task}.json", {
            "kind": ZEROSHOT_KIND, **description, "dataset": task, "metrics": result.metrics,
            "reported_metric": metrics_of[task], "protocol": protocol,
            "task": {**result.record, "n_shot": result.num_fewshot, "items": items.name,
                     "lm_eval": ran.get("versions", {}).get("lm-eval", lm_eval_version())},
            "provenance": {**provenance.record({"protocol": protocol, "task": task, "quantized": manifest["config_hash"]},
                                               device), "placement": placement,
                           **_revisions(args.model, local_revision if task in LOCAL_TASKS else result.record["dataset_revision"],
                                       tokenizer_class),
                           **({"vllm": {key: ran[key] for key in ("versions", "version_warnings")},
                               "exported": str(args.exported)} if ran["backend"] == "vllm" else {})},
        })
        shown = ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items() if not name.endswith("stderr"))
        print(f"{description['recipe']} on {task}: {shown}")
    if args.loglikelihoods:
        write_json(args.loglikelihoods, {task: {str(doc_id): values for doc_id, values in result.loglikelihoods.items()}
                                         for task, result in results.items()})


def _zeroshot_in_vllm(args, records: dict) -> tuple[dict, dict, dict, str]:
    """``eval-zeroshot --backend vllm``: the tasks scored by lm-eval's vllm model on ``--exported``,
    which must be an export of ``--quantized``; ``(results, the artifact's manifest, what ran them,
    the tokenizer's class)``."""
    from transformers import AutoTokenizer

    from ptqrepro.export.artifact import MANIFEST
    from ptqrepro.eval.zeroshot import HARNESS_SETTINGS
    from ptqrepro.eval.zeroshot_vllm import evaluate_zeroshot_vllm, vllm_python
    from ptqrepro.export.hf_directory import EXPORT_MANIFEST

    if not args.exported:
        raise InputError("eval-zeroshot --backend vllm: give --exported, the recipe's export for vLLM (ptqrepro export)")
    manifest = _read_json(str(Path(args.quantized) / MANIFEST), "--quantized")
    exported = _read_json(str(Path(args.exported) / EXPORT_MANIFEST), "--exported")
    if exported.get("artifact_config_hash") != manifest.get("config_hash"):
        raise InputError(f"--exported {args.exported} was exported from another artifact than --quantized {args.quantized} "
                         f"({exported.get('recipe')}, config hash {exported.get('artifact_config_hash')}): export it again")
    results, ran = evaluate_zeroshot_vllm(vllm_python(args.vllm_python), args.exported, args.tasks, args.include, records,
                                          args.batch_size, args.max_length, args.dtype, args.limit, args.num_fewshot,
                                          HARNESS_SETTINGS, args.vllm_log)
    for warning in ran["version_warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return results, manifest, ran, type(AutoTokenizer.from_pretrained(args.exported)).__name__


def cmd_export(args) -> None:
    from ptqrepro.export.hf_directory import export_model

    check_writable(args.out, "--out", folder=True)
    manifest = export_model(args.model, args.quantized, args.format, args.out, args.drop_activation_quantization,
                            args.target)
    dropped = f", without its {', '.join(manifest['dropped'])}" if manifest["dropped"] else ""
    print(f"{manifest['recipe']} -> {args.out} ({args.format}{dropped})")


def cmd_vllm_check(args) -> None:
    from ptqrepro.export.vllm_check import vllm_check, write_check

    check_writable(args.out, "--out")
    record = vllm_check(args.exported, args.result, args.corpus, args.vllm_python, args.windows, args.dtype, args.log)
    write_check(record, args.out)
    print(f"{record['recipe']} in vLLM ({record['dtype']}, {record['windows']} windows): largest window NLL "
          f"difference {record['max_abs_difference']:.3g} nats -> {args.out}")


def _bootstrap(args):
    from ptqrepro.report.uncertainty import BootstrapSettings

    return BootstrapSettings(samples=args.bootstrap_samples, seed=args.bootstrap_seed, level=args.level)


def cmd_tables(args) -> None:
    from ptqrepro.report.tables import gather_results, summarize, with_averages, write_tables

    settings = _bootstrap(args)
    check_writable(args.out, "--out", folder=True)
    results = gather_results(args.results)
    averages = load_yaml(args.averages, "--averages") if args.averages else {}
    if not isinstance(averages, dict) or not all(isinstance(tasks, dict) and tasks for tasks in averages.values()):
        raise PtqError("--averages: give {name: {task: acc or acc_norm, ...}, ...}")
    paths = write_tables(results, with_averages(summarize(results, settings), averages), args.out, settings)
    print(" ".join(str(path) for path in paths.values()))


def cmd_agreement(args) -> None:
    from ptqrepro.export.artifact import load_artifact
    from ptqrepro.report.peers import grid_agreement

    ours, peer = load_artifact(args.ours), load_artifact(args.peer)
    check_writable(args.out, "--out")
    agreement = grid_agreement(ours, peer)
    manifest = peer.manifest
    write_json(args.out, {"kind": AGREEMENT_KIND, "model": manifest["model"], "recipe": manifest["recipe"],
                          "seed": manifest.get("calibration_seed"), "ours": ours.manifest["recipe"], **agreement})
    print(f"{manifest['recipe']} vs {ours.manifest['recipe']}: {100 * agreement['same_grid_point']:.2f} % on the same grid point")


def cmd_peers(args) -> None:
    from ptqrepro.report.peers import peers_table, write_peers_table
    from ptqrepro.report.tables import gather_results

    settings = _bootstrap(args)
    documents = {path: _read_json(path, "results") for path in args.results}
    check_writable(args.out, "--out", folder=True)
    agreements = [document for document in documents.values() if document.get("kind") == AGREEMENT_KIND]
    quantize_results = [document for document in documents.values() if document.get("kind") == QUANTIZE_KIND]
    results = gather_results([path for path, document in documents.items() if document.get("kind") != AGREEMENT_KIND])
    table = peers_table(results, quantize_results, agreements, settings)
    print(" ".join(str(path) for path in write_peers_table(table, args.out, settings).values()))


TABLE_FIGURES = ("ppl_vs_bits", "accuracy_vs_bits", "lqer_ranks", "job_costs")
"""The figures of all.csv; ``--figure F`` draws ``report.plots.plot_F``."""


def cmd_plots(args) -> None:
    from ptqrepro.report import plots

    if args.dwr:
        source, draw = _read_json(args.dwr, "--dwr"), plots.plot_dwr_curves
    elif args.magr:
        source, draw = _read_json(args.magr, "--magr"), plots.plot_magr_row_maxima
    else:
        source, draw = _summary_table(args.table), getattr(plots, f"plot_{args.figure}")
    check_writable(f"{args.out}.png", "--out")
    paths = draw(source, args.out)
    print(" ".join(str(path) for path in paths))


def cmd_paper_tables(args) -> None:
    from ptqrepro.report.paper_tables import load_reference, paper_sections, with_ours, write_paper_tables

    results = _summary_table(args.table)
    check_writable(args.out, "--out", folder=True)
    sections = paper_sections(with_ours(load_reference(args.reference), results), results)
    print(" ".join(str(path) for path in write_paper_tables(sections, args.out)))


def cmd_claims(args) -> None:
    from ptqrepro.report.claims import check_claims, claims_from_config, write_claims

    entries = load_yaml(args.claims, "--claims") if args.claims else []
    settings = _bootstrap(args)
    claims = claims_from_config(entries or [])
    summary, windows = _summary_table(args.table), _windows_table(args.windows)
    check_writable(args.out, "--out", folder=True)
    table = check_claims(claims, summary, windows, settings)
    paths = write_claims(table, args.out, settings)
    counts = table["verdict"].value_counts()
    print(", ".join(f"{count} {verdict}" for verdict, count in counts.items()) or "no claims", "->", paths["md"])


def cmd_compare(args) -> None:
    from ptqrepro.report.compare import compare_runs, write_comparison

    settings = _bootstrap(args)
    first, second = (_windows_table(path) for path in args.windows)
    check_writable(args.out, "--out", folder=True)
    table = compare_runs(first, second, settings)
    paths = write_comparison(table, args.out, tuple(args.labels), settings)
    print(f"{len(table)} measurements, {int(table['resolved'].sum())} moved beyond the windows' noise ->", paths["md"])


def cmd_compare_claims(args) -> None:
    from ptqrepro.report.claims import claims_from_config
    from ptqrepro.report.compare import compare_verdicts, read_run, write_verdict_comparison

    settings = _bootstrap(args)
    config = load_yaml(Path(args.config).read_text(), args.config)
    claims = claims_from_config(config.get("claims") or [])
    runs = [read_run(folder) for folder in args.runs]
    table = compare_verdicts(claims, runs[0][:2], runs[1][:2], settings)
    labels = tuple(args.labels or (Path(folder).name for folder in args.runs))
    paths = write_verdict_comparison(table, args.out, labels, (runs[0][2], runs[1][2]))
    print(f"{int(table['differs'].sum())} of {len(table)} claims differ ->", paths["md"])


def _check_outputs(args) -> None:
    """A quantize or DWR job's outputs writable, checked before its work (``io.check_writable``)."""
    for option, folder in (("out", True), ("metrics", False), ("checkpoint_dir", True)):
        if getattr(args, option):
            check_writable(getattr(args, option), f"--{option.replace('_', '-')}", folder=folder)


def _positive(text: str) -> int:
    """An argument that counts something (windows, items, a batch, threads): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    """An argument that may be zero (few-shot examples): an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad argument is one line ``ptqrepro <command>: error: ...`` (exit
    code 2) like every other bad input, without the usage text before it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help with the epilog's example kept as written, and each option's default after
    its help text; none for a required option, a flag, or an option without a default (its help
    says what leaving it out does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (action.required or default is None or default is False or default is argparse.SUPPRESS
                or default == [] or "%(default)" in text):
            return text
        shown = " ".join(map(str, default)).replace("%", "%%") if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


DESCRIPTION = ("one subcommand per stage of the quantization pipeline, each usable by hand:\n"
               "`ptqrepro COMMAND -h` shows its options with their defaults, and an example")

EXAMPLE_WIDTH = 100
"""An example wider than this is broken before its options, each line but the last ending in a backslash."""


def _command(sub, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A subcommand: ``summary`` in ``ptqrepro -h`` and atop its own help, ``example`` (one
    invocation, ``ptqrepro <name> ...``) below its options, as a shell would take it."""
    lines = [""]
    for piece in example.replace(" --", "\0--").split("\0"):
        if lines[-1] and len(lines[-1]) + len(piece) >= EXAMPLE_WIDTH:
            lines.append("")
        lines[-1] += (" " if lines[-1] else "") + piece
    return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter,
                          epilog="example:\n  " + " \\\n      ".join(lines))


MODEL_DIR = "results/models/smollm2-135m"
CORPUS_DIR = "results/corpora/wiki-mini"
CALIBRATION_FILE = "results/calibration/smollm2-135m/wiki-mini-n10-l512-s0.pt"
RUN = "smollm2-135m/gptq@int3/s0"
"""The paths of the default run that the subcommands' examples use (``Snakefile``'s layout)."""


def _add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="prepared model directory (prepare-model)")


def _add_compute_arguments(p: argparse.ArgumentParser, batch_size: int, dtype_help: str) -> None:
    """Where and how a job computes: device, batch, dtype and threads."""
    p.add_argument("--batch-size", type=_positive, default=batch_size, help="sequences per forward pass")
    p.add_argument("--dtype", default="auto", help=dtype_help)
    p.add_argument("--device", default="auto", help="cpu, cuda[:N], or auto: cuda where a GPU is visible, else cpu")
    p.add_argument("--threads", type=_positive, help="torch and BLAS threads (default: one per core)")


def _add_placement_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--placement", default="auto", choices=PLACEMENTS,
                   help="whole: the model on the device; layers: one decoder layer at a time there; auto: whole where it fits")


def _add_tokenizer_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="fast", choices=TOKENIZERS, help="fast, or slow (use_fast=False, as GPTQ datautils)")


EVAL_DTYPE_HELP = "float32, float16, bfloat16 or auto (see compute_dtype)"


def _add_recipe_job_arguments(p: argparse.ArgumentParser, spec_help: str, calibration_required: bool = True) -> None:
    """The arguments of a job that turns a model and calibration windows into an artifact."""
    _add_model_argument(p)
    p.add_argument("--calibration", required=calibration_required,
                   help="calibration windows from calibrate" + ("" if calibration_required else " (for a recipe that calibrates)"))
    p.add_argument("--recipe", required=True, help="recipe name")
    p.add_argument("--spec", required=True, help=spec_help)
    _add_compute_arguments(p, 8, "of the calibration forward passes: " + EVAL_DTYPE_HELP)
    p.add_argument("--offload", default="device",
                   help=f"where the calibration activations between layers are kept: {' or '.join(OFFLOADS)} (see ptqrepro.layerwise.placement)")
    p.add_argument("--out", required=True, help="artifact directory")
    p.add_argument("--metrics", required=True, help="result JSON")
    p.add_argument("--checkpoint-dir", help="save every finished layer there and resume from it (deleted on success; "
                                            "default: no checkpoints)")


def _add_bootstrap_arguments(p: argparse.ArgumentParser) -> None:
    """How intervals are computed (``report.uncertainty.BootstrapSettings``)."""
    p.add_argument("--bootstrap-samples", type=_positive, default=2000, help="bootstrap replicates")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap's draws")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ptqrepro", description=DESCRIPTION, formatter_class=_HelpFormatter,
                     epilog="example:\n  ptqrepro quantize -h")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "prepare-model", "convert/record a model source into a prepared directory",
                 f"ptqrepro prepare-model --name smollm2-135m --spec '{{hub: HuggingFaceTB/SmolLM2-135M}}' --out {MODEL_DIR}")
    p.add_argument("--name", required=True, help="the model's key in the config (names the prepared directory's model)")
    p.add_argument("--spec", required=True, help="the model's config entry, inline YAML/JSON")
    p.add_argument("--out", required=True, help="prepared model directory")
    p.set_defaults(func=cmd_prepare_model)

    p = _command(sub, "prepare-corpus", "write a corpus's train/validation/test splits as JSONL",
                 f"ptqrepro prepare-corpus --name wiki-mini --out {CORPUS_DIR}")
    p.add_argument("--name", required=True, help="a built-in corpus (wiki-mini, wikitext2, c4, slimpajama) or a config key")
    p.add_argument("--spec", help="overrides of the built-in corpus definition, inline YAML/JSON (default: none)")
    p.add_argument("--out", required=True, help="prepared corpus directory")
    p.set_defaults(func=cmd_prepare_corpus)

    p = _command(sub, "calibrate", "draw seeded calibration windows from a corpus's train split",
                 f"ptqrepro calibrate --model {MODEL_DIR} --corpus {CORPUS_DIR} --nsamples 10 --seqlen 512 --seed 0 "
                 f"--out {CALIBRATION_FILE}")
    p.add_argument("--model", required=True, help="prepared model directory (for its tokenizer)")
    p.add_argument("--corpus", required=True, help="prepared corpus directory")
    p.add_argument("--nsamples", type=_positive, required=True, help="calibration windows")
    p.add_argument("--seqlen", type=_positive, required=True, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows' draw")
    _add_tokenizer_argument(p)
    p.add_argument("--out", required=True, help="calibration file (.pt)")
    p.set_defaults(func=cmd_calibrate)

    p = _command(sub, "quantize", "apply a recipe layer by layer and write the quantized artifact",
                 f"ptqrepro quantize --model {MODEL_DIR} --calibration {CALIBRATION_FILE} --recipe gptq@int3 "
                 f"--spec '{{steps: [gptq], weight: int3}}' --out results/quantized/{RUN} "
                 f"--metrics results/metrics/{RUN}/quantize.json")
    _add_recipe_job_arguments(p, "the recipe's config entry, inline YAML/JSON", calibration_required=False)
    p.set_defaults(func=cmd_quantize)

    p = _command(sub, "dwr", "DWR's block-by-block search on a quantized model (a new artifact)",
                 f"ptqrepro dwr --model {MODEL_DIR} --calibration {CALIBRATION_FILE} --base results/quantized/{RUN} "
                 "--recipe gptq+dwr@int3 --spec '{base: gptq@int3, dwr: {ranks: [16, 32], windows: 1}}' "
                 "--out results/quantized/smollm2-135m/gptq+dwr@int3/s0 "
                 "--metrics results/metrics/smollm2-135m/gptq+dwr@int3/s0/quantize.json")
    _add_recipe_job_arguments(p, "the recipe's config entry {base, dwr}, inline YAML/JSON")
    p.add_argument("--base", required=True, help="artifact directory of the base recipe")
    p.set_defaults(func=cmd_dwr)

    p = eval_ppl = _command(sub, "eval-ppl", "perplexity of a quantized model with the GPTQ protocol",
                            f"ptqrepro eval-ppl --model {MODEL_DIR} --quantized results/quantized/{RUN} --corpus {CORPUS_DIR} "
                            "--seqlen 512 --max-windows 24 --reference results/reference/smollm2-135m/wiki-mini.safetensors "
                            f"--out results/metrics/{RUN}/ppl-wiki-mini.json")
    _add_model_argument(p)
    p.add_argument("--quantized", required=True, help="artifact directory from quantize")
    p.add_argument("--corpus", required=True, help="prepared corpus directory (its test split is scored)")
    p.add_argument("--seqlen", type=_positive, default=2048, help="tokens per window")
    p.add_argument("--max-windows", type=_positive,
                   help="that many windows spread evenly over the test text (default: every window)")
    p.add_argument("--nsamples", type=_positive, default=256, help="windows drawn by the per-document (C4) protocol")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-document (C4) protocol's draw")
    _add_tokenizer_argument(p)
    _add_compute_arguments(p, 4, EVAL_DTYPE_HELP)
    _add_placement_argument(p)
    p.add_argument("--reference", help="the float model's top-k log-probabilities (float-reference): adds KL and flips "
                                       "(default: perplexity alone)")
    p.add_argument("--out", required=True, help="result JSON")
    p.set_defaults(func=cmd_eval_ppl)

    p = _command(sub, "float-reference", "the float model's top-k next-token log-probabilities on the evaluation windows",
                 f"ptqrepro float-reference --model {MODEL_DIR} --corpus {CORPUS_DIR} --seqlen 512 --max-windows 24 "
                 "--out results/reference/smollm2-135m/wiki-mini.safetensors")
    # eval-ppl's own options but the quantized model's and the outputs: the same windows, tokens and dtype
    for action in eval_ppl._actions:
        if action.dest not in ("help", "quantized", "reference", "out"):
            p._add_action(copy.copy(action))
    p.add_argument("--top-k", type=_positive, default=128, help="log-probabilities kept per token")
    p.add_argument("--out", required=True, help="safetensors file")
    p.set_defaults(func=cmd_float_reference)

    p = _command(sub, "zeroshot-tasks", "write the local zero-shot tasks (data and lm-eval YAMLs) from a corpus's test split",
                 f"ptqrepro zeroshot-tasks --corpus {CORPUS_DIR} --items 30 --seed 0 --out results/zeroshot/wiki-mini-n30-s0")
    p.add_argument("--corpus", required=True, help="prepared corpus directory")
    p.add_argument("--items", type=_positive, default=200, help="items per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the items' draw")
    p.add_argument("--out", required=True, help="task directory (lm-eval include_path)")
    p.set_defaults(func=cmd_zeroshot_tasks)

    p = _command(sub, "eval-zeroshot", "zero-shot accuracy of a quantized model through lm-eval-harness",
                 f"ptqrepro eval-zeroshot --model {MODEL_DIR} --quantized results/quantized/{RUN} "
                 "--tasks ptq_lastword ptq_nextsentence --include results/zeroshot/wiki-mini-n30-s0 "
                 f"--out-dir results/metrics/{RUN}")
    _add_model_argument(p)
    p.add_argument("--quantized", required=True, help="artifact directory from quantize")
    p.add_argument("--tasks", required=True, nargs="+", help="lm-eval task names (local ones need --include)")
    p.add_argument("--include", help="folder of task YAMLs (from zeroshot-tasks; default: lm-eval's own tasks only)")
    p.add_argument("--max-length", type=_positive, default=2048, help="longest sequence scored, in tokens")
    p.add_argument("--limit", type=_positive, help="score only the first N items of each task (default: every item)")
    p.add_argument("--num-fewshot", type=_count, default=0, help="examples per prompt (0: zero-shot)")
    p.add_argument("--metric", nargs="*", default=[], metavar="TASK=METRIC",
                   help="the accuracy reported per task (acc, acc_norm; default: acc for every task)")
    p.add_argument("--staged", help="the stage-tasks record of the hub tasks (checks lm-eval's version; default: no check)")
    _add_compute_arguments(p, 8, EVAL_DTYPE_HELP)
    _add_placement_argument(p)
    p.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                   help="hf: lm-eval's HF model on our in-memory model; vllm: lm-eval's vllm model on --exported, in "
                        "vLLM's own environment")
    p.add_argument("--exported", help="--backend vllm: the export of --quantized that vLLM serves (ptqrepro export)")
    p.add_argument("--vllm-python", help="--backend vllm: python of vLLM's environment, with lm-eval (default: $PTQ_VLLM_PYTHON)")
    p.add_argument("--vllm-log", help="--backend vllm: where vLLM's and lm-eval's output go")
    p.add_argument("--loglikelihoods", help="also write, per task and item, the log-likelihood of each request (JSON), "
                                            "to compare backends item by item")
    p.add_argument("--out-dir", required=True, help="writes zeroshot-<task>.json and its per-item zeroshot-<task>.items.csv there")
    p.set_defaults(func=cmd_eval_zeroshot)

    p = _command(sub, "stage-tasks", "build lm-eval's hub tasks once where the network is, so that jobs find their data offline",
                 "ptqrepro stage-tasks --tasks arc_easy piqa --metric arc_easy=acc_norm --out results/zeroshot/staged.json")
    p.add_argument("--tasks", required=True, nargs="+", help="lm-eval task names (local ones are skipped)")
    p.add_argument("--metric", nargs="*", default=[], metavar="TASK=METRIC",
                   help="the accuracy reported per task (acc, acc_norm): checked to exist (default: acc for every task)")
    p.add_argument("--out", required=True, help="the staging record (JSON): lm-eval's version, each task's dataset and version")
    p.set_defaults(func=cmd_stage_tasks)

    p = _command(sub, "export", "a quantized model as a Hugging Face model directory (transformers, vLLM)",
                 f"ptqrepro export --model {MODEL_DIR} --quantized results/quantized/{RUN} --format compressed-tensors "
                 f"--out results/export/{RUN}/compressed-tensors")
    p.add_argument("--model", required=True, help="prepared model directory")
    p.add_argument("--quantized", required=True, help="artifact directory from quantize or dwr")
    p.add_argument("--format", required=True,
                   help="compressed-tensors: the integer codes packed, with scales and zero points (integer grids only); "
                        "dequantized: float weights, for any recipe (see ptqrepro.export.hf_directory)")
    p.add_argument("--drop-activation-quantization", action="store_true",
                   help="export a recipe with activation quantization without it (recorded in ptqrepro-export.json)")
    p.add_argument("--target", default="transformers", choices=("transformers", "vllm-cpu"),
                   help="who serves it: vllm-cpu refuses at export what vLLM's CPU build cannot compute, names what it "
                        "can, and exports int8 W8A8 with its activation quantization")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=cmd_export)

    p = _command(sub, "vllm-check", "score an exported model in vLLM (its own environment) against eval-ppl's windows",
                 f"ptqrepro vllm-check --exported results/export/{RUN}/vllm-cpu "
                 f"--result results/export/{RUN}/vllm-reference-ppl-wiki-mini.json --corpus {CORPUS_DIR} "
                 f"--vllm-python ~/vllm/bin/python --windows 4 --out results/export/{RUN}/vllm-check.md")
    p.add_argument("--exported", required=True, help="exported model directory (ptqrepro export)")
    p.add_argument("--result", required=True, help="eval-ppl JSON of the same artifact, in the dtype vLLM runs")
    p.add_argument("--corpus", required=True, help="prepared corpus directory the result scored")
    p.add_argument("--vllm-python", help="python of vLLM's environment (default: $PTQ_VLLM_PYTHON)")
    p.add_argument("--windows", type=_positive, help="score the result's first N windows only (default: all of them)")
    p.add_argument("--dtype", default="bfloat16", help="vLLM's dtype (its CPU 4-bit kernel: bfloat16 or float16)")
    p.add_argument("--log", help="vLLM's output (default: discarded)")
    p.add_argument("--out", required=True, help="agreement table (Markdown; the record beside it as .json)")
    p.set_defaults(func=cmd_vllm_check)

    p = _command(sub, "tables", "gather result JSONs into all.csv, all.md, replicates.csv and windows.csv",
                 "ptqrepro tables --out results/tables results/metrics/smollm2-135m/*/s*/*.json")
    p.add_argument("--out", required=True, help="output directory")
    _add_bootstrap_arguments(p)
    p.add_argument("--averages", help="zero-shot averages to add, as JSON or YAML: {name: {task: acc|acc_norm}} (default: none)")
    p.add_argument("results", nargs="+", help="result JSONs of quantize, eval-ppl and eval-zeroshot")
    p.set_defaults(func=cmd_tables)

    p = _command(sub, "agreement", "how a peer toolkit's quantized linears agree with ours (same grid points)",
                 "ptqrepro agreement --ours results/quantized/smollm2-135m/gptq@int4-g64/s0 "
                 "--peer results/quantized/smollm2-135m/llmc-gptq@int4-g64/s0 "
                 "--out results/metrics/smollm2-135m/llmc-gptq@int4-g64/s0/agreement.json")
    p.add_argument("--ours", required=True, help="artifact directory of our recipe")
    p.add_argument("--peer", required=True, help="artifact directory of the peer recipe that mirrors it")
    p.add_argument("--out", required=True, help="result JSON")
    p.set_defaults(func=cmd_agreement)

    p = _command(sub, "peers", "the peers table: our recipes beside the same recipes by peer toolkits",
                 "ptqrepro peers --out results/tables results/metrics/smollm2-135m/gptq@int4-g64/s0/*.json "
                 "results/metrics/smollm2-135m/llmc-gptq@int4-g64/s0/*.json")
    p.add_argument("--out", required=True, help="output directory for peers.csv and peers.md")
    _add_bootstrap_arguments(p)
    p.add_argument("results", nargs="+", help="quantize, perplexity and agreement JSONs of the peer recipes and the recipes they mirror")
    p.set_defaults(func=cmd_peers)

    p = _command(sub, "plots", "a figure of the report (PNG and PDF)",
                 "ptqrepro plots --table results/tables/all.csv --figure ppl_vs_bits --out results/plots/ppl_vs_bits")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--table", help="all.csv from tables: the --figure")
    source.add_argument("--dwr", help="a dwr job's quantize.json: its search curves per block")
    source.add_argument("--magr", help="a MagR recipe's quantize.json: per-channel max|W| before and after")
    p.add_argument("--figure", default="ppl_vs_bits", choices=TABLE_FIGURES, help="which figure of the table")
    p.add_argument("--out", required=True, help="output path without extension")
    p.set_defaults(func=cmd_plots)

    p = _command(sub, "paper-tables", "each paper's tables with our numbers beside its (Markdown, LaTeX)",
                 "ptqrepro paper-tables --table results/tables/all.csv --reference config/reference/magr.csv "
                 "config/reference/lqer.csv --out results/tables/papers")
    p.add_argument("--table", required=True, help="all.csv from tables")
    p.add_argument("--reference", required=True, nargs="+", help="config/reference/*.csv files")
    p.add_argument("--out", required=True, help="output directory (one .md and .tex per paper)")
    p.set_defaults(func=cmd_paper_tables)

    p = _command(sub, "compare", "how far each perplexity moved between two runs (another machine, dtype or commit)",
                 "ptqrepro compare --windows benchmarks/runs/A/windows.csv benchmarks/runs/B/windows.csv "
                 "--labels A B --out results/compare")
    p.add_argument("--windows", required=True, nargs=2, metavar=("A", "B"), help="the two runs' windows.csv from tables")
    p.add_argument("--labels", nargs=2, default=("a", "b"), metavar=("A", "B"), help="names of the two runs in compare.md")
    p.add_argument("--out", required=True, help="output directory for compare.csv and compare.md")
    _add_bootstrap_arguments(p)
    p.set_defaults(func=cmd_compare)

    p = _command(sub, "compare-claims", "every claim whose verdict differs between two kept runs (benchmarks/runs/)",
                 "ptqrepro compare-claims --runs benchmarks/runs/A benchmarks/runs/B --config config/config.yaml "
                 "--out results/compare-claims")
    p.add_argument("--runs", required=True, nargs=2, metavar=("A", "B"),
                   help="two kept runs' folders, each with all.csv, windows.csv and provenance.json")
    p.add_argument("--config", required=True, help="the config whose claims are judged (e.g. config/config.yaml)")
    p.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the runs (default: the folders' names)")
    p.add_argument("--out", required=True, help="output directory for compare-claims.csv and compare-claims.md")
    _add_bootstrap_arguments(p)
    p.set_defaults(func=cmd_compare_claims)

    p = _command(sub, "claims", "check the papers' claims (config 'claims') against all.csv",
                 "ptqrepro claims --table results/tables/all.csv --windows results/tables/windows.csv "
                 "--claims '[{paper: GPTQ, claim: GPTQ below RTN at INT3, below: [gptq@int3, rtn@int3]}]' --out results/tables")
    p.add_argument("--table", required=True, help="all.csv from tables")
    p.add_argument("--claims", required=True, help="the config's claims list, inline YAML/JSON")
    p.add_argument("--windows", required=True, help="windows.csv from tables (per-window losses)")
    p.add_argument("--out", required=True, help="output directory for claims.csv and claims.md")
    _add_bootstrap_arguments(p)
    p.set_defaults(func=cmd_claims)
    return parser


INTERRUPTED = 130
"""Exit code of a command stopped by SIGINT or SIGTERM (the shell's 128 + SIGINT)."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it unwinds as from Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Within the block SIGTERM (a scheduler's or Snakemake's stop) unwinds the command as Ctrl-C
    does: every ``atomic_path`` removes its temporary, a checkpoint folder keeps its finished layers.
    After the first stop signal the others are ignored, so that none cuts that cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(signum) is not signal.SIG_IGN}  # a signal ignored by who started us stays so
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _option_of(args, path) -> str | None:
    """The command-line argument that named ``path`` or a folder above it (``--out``, ``results``)."""
    if path is None:
        return None
    path = Path(path)
    for name, value in vars(args).items():
        for given in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(given, str) and (path == Path(given) or Path(given) in path.parents):
                return name if name == "results" else f"--{name.replace('_', '-')}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A bad argument is exit code 2, a missing, empty or corrupt input 1 (each
    one line on stderr), an interrupt (SIGINT, SIGTERM) 130 with nothing half-written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _terminate_as_interrupt():
            args.func(args)
    except PtqError as error:
        print(f"ptqrepro: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # a file or folder an argument names: missing, of the wrong kind, not readable
        option = _option_of(args, error.filename)
        if option is None:
            raise
        print(f"ptqrepro: error: {option} {error.filename}: {error.strerror or first_line(error)}", file=sys.stderr)
        return InputError.exit_code
    except KeyboardInterrupt as interrupt:
        signal_name = "SIGTERM" if isinstance(interrupt, _Terminated) else "SIGINT"
        print(f"ptqrepro {args.command}: interrupted by {signal_name}; nothing half-written is left "
              "(a quantize or dwr job with --checkpoint-dir keeps its finished layers)", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
