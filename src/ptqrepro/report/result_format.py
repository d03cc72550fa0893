"""The format of the result JSONs in results/metrics/<model>/<recipe>/s<seed>/: their kinds and keys.

Each job writes one JSON object (``ptqrepro quantize`` and ``dwr``: ``quantize.json``; ``eval-ppl``:
``ppl-<dataset>.json``; ``eval-zeroshot``: ``zeroshot-<task>.json``; ``agreement``:
``agreement.json``) whose ``kind`` names which of ``RESULT_KEYS`` it carries. Every result of a
quantized model repeats ``RECIPE_KEYS`` and ``CALIBRATION_KEYS`` of its artifact's manifest;
``metrics`` maps a metric's name to a number (or null), ``provenance`` holds ``PROVENANCE_RECORD_KEYS``.
The jobs write these keys and no other, and ``report.tables``, ``report.peers``, ``report.plots``
and ``vllm_check`` read no other (tests/test_result_format.py checks both).
"""

from __future__ import annotations

QUANTIZE_KIND = "quantize"
PERPLEXITY_KIND = "perplexity"
ZEROSHOT_KIND = "zeroshot"
AGREEMENT_KIND = "agreement"

RECIPE_KEYS = (
    "model",
    "recipe",
    "method",
    "weight_format",
    "weight_scheme",
    "weight_bits",
    "bits_per_weight",
    "act_format",
)
"""Top-level keys that describe the quantized model a result belongs to (its artifact's manifest)."""

CALIBRATION_KEYS = ("calibration_seed", "calibration_dtype")
"""How the model was calibrated: None for a recipe that reads no calibration data, and in results
written before they were recorded."""

MEASUREMENT_KEYS = ("kind", "dataset")
"""Top-level keys that describe what was measured."""

UNCALIBRATED = "none"
"""The ``dataset`` of a quantize result of a recipe that reads no calibration data."""

WINDOW_KEYS = {"nll": "window_nll", "kld": "window_kld", "flips": "window_flips"}
"""A perplexity result's per-window values: the metric's name -> the result's key (one number per
window; ``window_kld`` and ``window_flips`` null without a float reference)."""

PEER_KEYS = ("toolkit", "toolkit_version", "mirrors", "differences")
"""What a quantize result of a peer toolkit's recipe adds: the toolkit, its version, the recipe of
ours it mirrors and how it differs from it."""

AGREEMENT_KEYS = ("ours", "linears", "weights", "same_grid_point", "same_code", "weight_rel_diff",
                  "same_grid_point_by_layer")
"""What an agreement result holds beside ``model``, ``recipe`` and ``seed`` (``report.peers.grid_agreement``)."""

_MODEL_RESULT_KEYS = (*MEASUREMENT_KEYS, *RECIPE_KEYS, *CALIBRATION_KEYS, "metrics", "provenance")

RESULT_KEYS = {
    QUANTIZE_KIND: frozenset((*_MODEL_RESULT_KEYS, "settings", "layers", "dwr", *PEER_KEYS)),
    PERPLEXITY_KIND: frozenset((*_MODEL_RESULT_KEYS, "protocol", *WINDOW_KEYS.values())),
    ZEROSHOT_KIND: frozenset((*_MODEL_RESULT_KEYS, "protocol", "reported_metric", "task")),
    AGREEMENT_KIND: frozenset(("kind", "model", "recipe", "seed", *AGREEMENT_KEYS)),
}
"""The top-level keys a result of each kind may carry. A quantize result has ``layers`` (one record
per quantized linear) or, from ``dwr``, ``dwr`` (each block's search curve); ``settings`` is what
its config hash covers. An evaluation has its ``protocol``; a zero-shot result the ``task``'s
record and the ``reported_metric`` (acc or acc_norm)."""

PROVENANCE_KEYS = ("config_hash", "git_commit", "device", "wall_time_s", "peak_rss_mb")
"""Keys of ``provenance`` that every row of the tables copies."""

REVISION_KEYS = ("model_revision", "dataset_revision", "tokenizer_class")
"""Keys of ``provenance`` naming the exact inputs: the hub commits of the model and of the dataset
(None for a local source, and in results written before they were recorded) and the tokenizer class."""

PROVENANCE_RECORD_KEYS = frozenset((*PROVENANCE_KEYS, *REVISION_KEYS, "packages", "python", "host", "hardware",
                                    "peak_cuda_mb", "created", "offload", "placement"))
"""The keys of ``provenance`` (``provenance.Provenance.record``, with a quantize job's ``offload``
and an evaluation's ``placement``)."""

PERPLEXITY_PROTOCOL_KEYS = frozenset(("seqlen", "windows", "total_windows", "max_windows", "dtype", "sampling", "split",
                                      "seed", "tokenizer", "tokenizer_class", "windows_sha256", "kld_top_k"))
"""The keys of a perplexity result's ``protocol``: its windows (``windows_sha256`` fingerprints their
tokens), the dtype and tokenizer they were scored with."""


def undeclared_keys(result: dict) -> list[str]:
    """The keys of ``result`` this format does not declare for its kind (``provenance.`` and, for a
    perplexity result, ``protocol.`` prefixed); an unknown kind is itself undeclared."""
    kind = result.get("kind")
    if kind not in RESULT_KEYS:
        return [f"kind={kind!r}"]
    undeclared = sorted(set(result) - RESULT_KEYS[kind])
    undeclared += sorted(f"provenance.{key}" for key in set(result.get("provenance") or {}) - PROVENANCE_RECORD_KEYS)
    if kind == PERPLEXITY_KIND:
        undeclared += sorted(f"protocol.{key}" for key in set(result.get("protocol") or {}) - PERPLEXITY_PROTOCOL_KEYS)
    return undeclared
