"""Corpus definitions and loaders: wiki-mini (offline Wikipedia), WikiText-2, C4 and SlimPajama-6B (hub),
local folders.

Every corpus is materialised as ``{train,validation,test}.jsonl`` (one ``{"text": ...}`` document per
line) so that later pipeline steps read plain files and never touch the original source again.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from xml.etree import ElementTree

from ptqrepro.errors import InputError, PtqError
from ptqrepro.runtime.io import atomic_path, read_json

SPLITS = ("train", "validation", "test")
SOURCES = ("gensim-wiki", "hub", "local")
SAMPLINGS = ("concatenated", "documents", "chunks")
EXACT_LENGTH_RULES = ("keep", "redraw")
README = "README.md"

GENSIM_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_PARAGRAPH_WORDS = 12
DROPPED_SECTIONS = frozenset(
    {"references", "see also", "external links", "further reading", "notes", "bibliography"}
)
DROPPED_TAGS = frozenset(
    {"ref", "references", "table", "math", "gallery", "imagemap", "timeline", "score", "chem", "hiero"}
)
NON_PROSE_LINK_NAMESPACES = frozenset({"file", "image", "category", "media"})
LIST_MARKUP = ("*", "#", ";", ":")
LIST_MARK = "\x00"
MARKUP_RESIDUE = ("{{", "}}", "[[", "]]", "''", "<", ">", "|")


def _identity_splits() -> dict[str, str]:
    return {split: split for split in SPLITS}


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus comes from and which window protocol applies to it (``ptqrepro.data.windows``).

    ``sampling``: ``concatenated`` (GPTQ datautils get_wikitext2), ``documents`` (GPTQ get_c4) or
    ``chunks`` (LQER's datasets ``map`` pipeline). ``train_join`` / ``test_join`` join the documents
    of the train (calibration) / test (evaluation) split before they are tokenized.
    ``exact_length_documents``: what the ``documents`` evaluation does with a drawn document of
    exactly ``seqlen`` tokens: ``keep`` it (the window is the whole document, no start is drawn) or
    ``redraw`` (MagR datautils.py get_c4_llama3); GPTQ's get_c4 raises there (``randint(0, -1)``).
    ``train_documents``: keep only the first N documents of the train split (LQER's
    ``num_raw_samples``). ``chunk_shards`` and ``chunk_batch``: the ``chunks`` protocol's
    ``num_proc`` and ``batch_size`` of ``datasets.map`` (:func:`ptqrepro.data.windows.chunk_windows`).
    """

    name: str
    source: str
    path: str | None = None
    config_name: str | None = None
    data_files: dict[str, str] | None = None
    splits: dict[str, str] = field(default_factory=_identity_splits)
    text_field: str = "text"
    sampling: str = "concatenated"
    train_join: str = " "
    test_join: str = "\n\n"
    exact_length_documents: str = "keep"
    train_documents: int | None = None
    chunk_shards: int = 8
    chunk_batch: int = 1000


C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"
# The first of SlimPajama-6B's 48 train shards (datasets reads a split's files in name order): it
# holds the split's first documents, the only ones LQER reads (4096); the other 47 are not needed.
SLIMPAJAMA_FIRST_TRAIN_SHARD = "data/train-00000-of-00048-*.parquet"

BUILTIN_CORPORA: dict[str, CorpusSpec] = {
    "wiki-mini": CorpusSpec(name="wiki-mini", source="gensim-wiki"),
    # IST-DASLab/gptq datautils.py get_wikitext2: both splits joined with "\n\n" (SparseGPT's
    # datautils joins the train split with " ": `train_join: " "`); the hub repository that
    # `load_dataset("wikitext")` is redirected to.
    "wikitext2": CorpusSpec(
        name="wikitext2",
        source="hub",
        path="Salesforce/wikitext",
        config_name="wikitext-2-raw-v1",
        train_join="\n\n",
    ),
    # IST-DASLab/gptq datautils.py get_c4: one train and one validation shard, per-document windows.
    "c4": CorpusSpec(
        name="c4",
        source="hub",
        path="allenai/c4",
        data_files={"train": C4_TRAIN_SHARD, "validation": C4_VALIDATION_SHARD},
        splits={"train": "train", "validation": "validation", "test": "validation"},
        sampling="documents",
    ),
    # ChengZhang-98/lqer src/lqer/datasets/slim_pajama.py with the profile settings of its
    # experiments/configs/template/*.toml: the first 4096 train documents, joined with "\n\n" per
    # datasets.map batch (8 processes), cut into consecutive windows. Calibration only.
    "slimpajama": CorpusSpec(
        name="slimpajama",
        source="hub",
        path="DKYoon/SlimPajama-6B",
        data_files={"train": SLIMPAJAMA_FIRST_TRAIN_SHARD},
        splits={"train": "train"},
        sampling="chunks",
        train_join="\n\n",
        train_documents=4096,
    ),
}


def corpus_spec(name: str, overrides: dict | None = None) -> CorpusSpec:
    """Resolve a corpus by name: a builtin with config ``overrides`` applied, or a corpus fully
    defined in the config (then ``overrides`` must give ``source``)."""
    overrides = dict(overrides or {})
    _check_override_keys(name, overrides)
    if name in BUILTIN_CORPORA:
        spec = dataclasses.replace(BUILTIN_CORPORA[name], **overrides)
    elif "source" in overrides:
        spec = CorpusSpec(name=name, **overrides)
    else:
        known = ", ".join(sorted(BUILTIN_CORPORA))
        raise PtqError(f"unknown corpus {name!r} (known: {known}; or give 'source' to define it)")
    return _validated(spec)


def _check_override_keys(name: str, overrides: dict) -> None:
    allowed = {f.name for f in dataclasses.fields(CorpusSpec)} - {"name"}
    for key in overrides:
        if key not in allowed:
            raise PtqError(
                f"corpus {name!r}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})"
            )


def _validated(spec: CorpusSpec) -> CorpusSpec:
    if spec.source not in SOURCES:
        raise PtqError(f"corpus {spec.name!r}: source {spec.source!r} is not one of {', '.join(SOURCES)}")
    if spec.sampling not in SAMPLINGS:
        raise PtqError(
            f"corpus {spec.name!r}: sampling {spec.sampling!r} is not one of {', '.join(SAMPLINGS)}"
        )
    if spec.exact_length_documents not in EXACT_LENGTH_RULES:
        raise PtqError(
            f"corpus {spec.name!r}: exact_length_documents {spec.exact_length_documents!r} is not one of "
            f"{', '.join(EXACT_LENGTH_RULES)}"
        )
    for key in ("train_join", "test_join"):
        if not isinstance(getattr(spec, key), str):
            raise PtqError(f"corpus {spec.name!r}: {key} must be a string, got {getattr(spec, key)!r}")
    for key in ("chunk_shards", "chunk_batch", "train_documents"):
        value = getattr(spec, key)
        if not (value is None and key == "train_documents") and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise PtqError(f"corpus {spec.name!r}: {key} must be a positive integer, got {value!r}")
    if spec.source in ("hub", "local") and not spec.path:
        raise PtqError(f"corpus {spec.name!r}: source {spec.source!r} needs a 'path'")
    for split in spec.splits:
        if split not in SPLITS:
            raise PtqError(f"corpus {spec.name!r}: split {split!r} is not one of {', '.join(SPLITS)}")
    return spec


def load_documents(spec: CorpusSpec, split: str) -> list[str]:
    """Read the documents of ``split`` (train/validation/test) from the corpus' original source; of
    the train split only the first ``train_documents`` when that is set."""
    if split not in spec.splits:
        raise PtqError(f"corpus {spec.name!r} has no split {split!r} (has: {', '.join(spec.splits)})")
    source_split = spec.splits[split]
    limit = spec.train_documents if split == "train" else None
    if spec.source == "gensim-wiki":
        documents = _load_gensim_wiki(spec, source_split)
    elif spec.source == "hub":
        documents = _load_hub(spec, source_split, limit)
    elif spec.source == "local":
        documents = _load_local(spec, source_split)
    else:
        raise PtqError(f"corpus {spec.name!r}: source {spec.source!r} is not one of {', '.join(SOURCES)}")
    if limit is None:
        return documents
    if len(documents) < limit:
        raise PtqError(
            f"corpus {spec.name!r}: its train split has {len(documents)} documents, fewer than "
            f"train_documents {limit}"
        )
    return documents[:limit]


def write_corpus(spec: CorpusSpec, out_dir: str | os.PathLike) -> dict:
    """Write ``out_dir/{split}.jsonl`` for every split of ``spec`` (atomically, one file at a time)
    and return ``{split: {"documents": n, "characters": n}}``."""
    out = Path(out_dir)
    stats = {}
    for split in (s for s in SPLITS if s in spec.splits):
        documents = load_documents(spec, split)
        if not any(document.strip() for document in documents):
            raise InputError(f"corpus {spec.name!r}: its {split} split ({spec.path or spec.source}, "
                             f"{spec.splits[split]!r}) holds no text")
        _write_jsonl(out / f"{split}.jsonl", documents)
        stats[split] = {"documents": len(documents), "characters": sum(len(d) for d in documents)}
    return stats


def read_documents(path: str | os.PathLike) -> list[str]:
    """Read the documents of one ``{split}.jsonl`` file written by :func:`write_corpus`."""
    return _read_jsonl_field(Path(path), "text")


SPLIT_FILE = "{split}.jsonl"
CORPUS_MANIFEST = "corpus.json"
"""A prepared corpus (``ptqrepro prepare-corpus``) is a folder of one ``SPLIT_FILE`` per split and
this manifest: its ``spec``, ``stats`` and hub ``revision``."""


def prepared_corpus(corpus_dir: str | os.PathLike) -> CorpusSpec:
    """The spec a prepared corpus folder was written from."""
    manifest = Path(corpus_dir) / CORPUS_MANIFEST
    if not manifest.is_file():
        raise InputError(f"{corpus_dir} is not a prepared corpus (no {CORPUS_MANIFEST}); run prepare-corpus")
    return CorpusSpec(**read_json(manifest)["spec"])


def prepared_documents(corpus_dir: str | os.PathLike, split: str) -> list[str]:
    """The documents of one split of a prepared corpus folder."""
    return read_documents(Path(corpus_dir) / SPLIT_FILE.format(split=split))


def _write_jsonl(path: Path, documents: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as stream:
        for document in documents:
            stream.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")


def _read_jsonl_field(path: Path, text_field: str) -> list[str]:
    documents = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise InputError(f"{path}:{number}: not a JSON line ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise InputError(f"{path}:{number}: no text field {text_field!r}")
            documents.append(record[text_field])
    return documents


# --- source "local" -------------------------------------------------------------------------------


def _load_local(spec: CorpusSpec, source_split: str) -> list[str]:
    folder = Path(spec.path)
    jsonl = folder / f"{source_split}.jsonl"
    text = folder / f"{source_split}.txt"
    if jsonl.is_file():
        return _read_jsonl_field(jsonl, spec.text_field)
    if text.is_file():
        return [text.read_text(encoding="utf-8")]
    raise InputError(f"corpus {spec.name!r}: neither {jsonl} nor {text} exists")


# --- source "hub" ---------------------------------------------------------------------------------


def _load_hub(spec: CorpusSpec, source_split: str, limit: int | None = None) -> list[str]:
    """``datasets.load_dataset(path, config, data_files=..., split=...)[text_field]`` as in GPTQ
    datautils (get_wikitext2, get_c4), of the first ``limit`` rows only where given (LQER's
    ``select(range(num_raw_samples))``). ``path`` is a local mirror of the hub repository, or a hub id:
    then the files it needs are staged once into the Hugging Face cache (``hub_snapshot``) and loaded
    from there, so that the load needs no network where they are cached."""
    import datasets

    folder = spec.path if Path(spec.path).expanduser().is_dir() else str(hub_snapshot(spec)[0])
    dataset = datasets.load_dataset(
        folder,
        spec.config_name,
        data_files=_hub_data_files(spec, source_split),
        split=source_split,
    )
    if spec.text_field not in dataset.column_names:
        raise PtqError(
            f"corpus {spec.name!r}: text_field {spec.text_field!r} not in columns {dataset.column_names}"
        )
    if limit is not None and len(dataset) > limit:
        dataset = dataset.select(range(limit))
    return list(dataset[spec.text_field])


def hub_snapshot(spec: CorpusSpec) -> tuple[Path, str]:
    """The snapshot folder in the Hugging Face cache of a hub corpus's dataset repository and its commit,
    holding only the files the corpus reads: its ``data_files``, or else its ``config_name``'s files
    as the repository's card (README.md) maps them, or else the whole repository."""
    from ptqrepro.runtime.hub import stage_dataset

    if spec.data_files:
        return stage_dataset(spec.path, tuple(sorted(set(spec.data_files.values()))))
    if spec.config_name is None:
        return stage_dataset(spec.path, None)
    card, _ = stage_dataset(spec.path, (README,))
    return stage_dataset(spec.path, (README, *_config_files(spec, card / README)))


def corpus_revision(spec: CorpusSpec) -> str | None:
    """The commit of a hub corpus's dataset repository it was read at (None: a local source)."""
    if spec.source != "hub" or Path(spec.path).expanduser().is_dir():
        return None
    return hub_snapshot(spec)[1]


def _config_files(spec: CorpusSpec, card: Path) -> list[str]:
    """The file patterns of ``spec.config_name`` in a dataset card's ``configs`` (datasets' metadata)."""
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    configs = MetadataConfigs.from_dataset_card_data(DatasetCard.load(card).data)
    if spec.config_name not in configs:
        raise PtqError(f"corpus {spec.name!r}: dataset {spec.path} has no config {spec.config_name!r} "
                       f"(has: {', '.join(configs) or 'none'})")
    data_files = configs[spec.config_name].get("data_files") or []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        data_files = [{"path": path} for path in data_files.values()]
    return sorted({path for entry in data_files for path in ([entry["path"]] if isinstance(entry["path"], str) else entry["path"])})


def _hub_data_files(spec: CorpusSpec, source_split: str) -> dict[str, str] | None:
    if spec.data_files is None:
        return None
    if source_split not in spec.data_files:
        raise PtqError(f"corpus {spec.name!r}: data_files has no entry for split {source_split!r}")
    return {source_split: spec.data_files[source_split]}


# --- source "gensim-wiki" -------------------------------------------------------------------------


def gensim_wiki_dump() -> Path:
    """Path of the shortened English Wikipedia dump shipped in the gensim wheel (gensim test data)."""
    package = importlib.util.find_spec("gensim")
    if package is None or not package.submodule_search_locations:
        raise PtqError("corpus source 'gensim-wiki' needs gensim: pip install gensim")
    dump = Path(next(iter(package.submodule_search_locations))) / GENSIM_WIKI_DUMP
    if not dump.is_file():
        raise PtqError(f"gensim is installed but its Wikipedia test dump is missing: {dump}")
    return dump


def wiki_split_of(article_index: int) -> str:
    """Split of the ``article_index``-th kept article in dump order: 9 mod 10 -> test,
    8 mod 10 -> validation, otherwise train (so every article is in exactly one split)."""
    remainder = article_index % 10
    if remainder == 9:
        return "test"
    if remainder == 8:
        return "validation"
    return "train"


def parse_wiki_dump(dump_path: str | os.PathLike) -> list[str]:
    """Clean WikiText-style documents of a MediaWiki ``.xml.bz2`` dump, in dump order.

    Keeps main-namespace (ns 0) pages that are not redirects. Wikitext is cleaned with
    mwparserfromhell: templates, comments, <ref>/<table>/<math> (and similar) tags, File:/Image:/
    Category: and interlanguage links are dropped, then ``strip_code``. The sections References,
    See also, External links, Further reading, Notes and Bibliography (with their subsections) are
    dropped, list items are skipped, and only paragraphs of at least 12 words are kept.
    Layout follows WikiText-2 raw: `` = Title = `` first, `` = = Section = = `` for level-2 headings,
    `` = = = Sub = = = `` for level 3, one paragraph or heading per line (joined with ``"\\n"``).
    Articles without any kept paragraph are left out.
    """
    articles = (_wiki_document(title, text) for title, text in _iter_articles(Path(dump_path)))
    return [article for article in articles if article is not None]


@functools.lru_cache(maxsize=2)
def _cached_wiki_dump(dump_path: str) -> tuple[str, ...]:
    return tuple(parse_wiki_dump(dump_path))


def _load_gensim_wiki(spec: CorpusSpec, source_split: str) -> list[str]:
    """Articles of the gensim dump (or of ``spec.path``, another ``.xml.bz2`` dump) in ``source_split``,
    split by article index as in :func:`wiki_split_of`."""
    dump = Path(spec.path) if spec.path else gensim_wiki_dump()
    if not dump.is_file():
        raise PtqError(f"corpus {spec.name!r}: wiki dump {dump} does not exist")
    articles = _cached_wiki_dump(str(dump))
    return [a for index, a in enumerate(articles) if wiki_split_of(index) == source_split]


def _iter_articles(dump_path: Path) -> Iterator[tuple[str, str]]:
    """Yield (title, wikitext) of each main-namespace page of the dump that is not a redirect."""
    with bz2.open(dump_path, "rb") as stream:
        for _, element in ElementTree.iterparse(stream, events=("end",)):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            is_article = element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None
            if is_article:
                yield element.findtext("{*}title"), element.findtext("{*}revision/{*}text") or ""
            element.clear()


def _wiki_document(title: str, wikitext: str) -> str | None:
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    _remove_non_prose(code)
    items = []
    for level, heading, body in _kept_sections(_sections(code)):
        if heading:
            items.append((max(level, 2), heading))  # a rare level-1 heading inside an article ranks as 2
        items.extend((0, paragraph) for paragraph in _paragraphs(body))
    items = _without_empty_headings(items)
    if not any(level == 0 for level, _ in items):
        return None
    lines = [_heading_line(1, title)] + [_heading_line(lv, text) if lv else text for lv, text in items]
    return "\n".join(lines)


def _heading_line(level: int, text: str) -> str:
    return f" {'= ' * level}{text}{' =' * level} "


def _remove_non_prose(code) -> None:
    """Drop comments, templates, DROPPED_TAGS and non-prose links from ``code``, recursively, in place."""
    code.nodes = [node for node in code.nodes if not _is_non_prose_node(node)]
    for node in code.nodes:
        for child in _prose_children(node):
            _remove_non_prose(child)


def _is_non_prose_node(node) -> bool:
    from mwparserfromhell.nodes import Comment, Tag, Template, Wikilink

    if isinstance(node, (Comment, Template)):
        return True
    if isinstance(node, Tag):
        return str(node.tag).strip().lower() in DROPPED_TAGS
    if isinstance(node, Wikilink):
        return _is_non_prose_link(str(node.title))
    return False


def _prose_children(node) -> list:
    """The nested wikicode of ``node`` that ``strip_code`` can turn into text."""
    from mwparserfromhell.nodes import ExternalLink, Heading, Tag, Wikilink

    if isinstance(node, Tag):
        candidates = [node.contents]
    elif isinstance(node, Wikilink):
        candidates = [node.title, node.text]
    elif isinstance(node, (ExternalLink, Heading)):
        candidates = [node.title]
    else:
        candidates = []
    return [child for child in candidates if child is not None]


def _is_non_prose_link(title: str) -> bool:
    """File:/Image:/Category:/Media: links and interlanguage links such as ``[[de:Anarchismus]]``."""
    title = title.strip()
    if ":" not in title or title.startswith(":"):
        return False
    prefix = title.split(":", 1)[0].strip()
    return prefix.lower() in NON_PROSE_LINK_NAMESPACES or _is_language_code(prefix)


def _is_language_code(prefix: str) -> bool:
    head, _, tail = prefix.partition("-")
    return 2 <= len(head) <= 3 and head.isascii() and head.isalpha() and head.islower() and (
        not tail or (tail.isascii() and tail.isalpha() and tail.islower())
    )


def _sections(code) -> list[tuple[int, str, str]]:
    """Split top-level nodes at headings into (level, heading text, plain body text); the lead has
    level 0. List items (``*``, ``#``, ``;``, ``:`` markup) become lines starting with LIST_MARK."""
    from mwparserfromhell.nodes import Heading, Tag, Text
    from mwparserfromhell.wikicode import Wikicode

    sections = [(0, "", [])]
    for node in code.nodes:
        if isinstance(node, Heading):
            sections.append((node.level, " ".join(node.title.strip_code().split()), []))
        elif isinstance(node, Tag) and node.wiki_markup in LIST_MARKUP:
            sections[-1][2].append(Text(LIST_MARK))
        else:
            sections[-1][2].append(node)
    return [(level, heading, Wikicode(body).strip_code()) for level, heading, body in sections]


def _kept_sections(sections: list[tuple[int, str, str]]) -> Iterator[tuple[int, str, str]]:
    """Leave out the reference-like sections in DROPPED_SECTIONS together with their subsections."""
    dropped_level = None
    for level, heading, body in sections:
        if dropped_level is not None and level > dropped_level:
            continue
        dropped_level = None
        if heading.lower() in DROPPED_SECTIONS:
            dropped_level = level
            continue
        yield level, heading, body


def _paragraphs(body: str) -> list[str]:
    """Prose paragraphs of at least MIN_PARAGRAPH_WORDS words, one per line; list items are skipped."""
    lines = (" ".join(line.split()) for line in body.split("\n") if LIST_MARK not in line)
    return [line for line in lines if _is_clean_paragraph(line)]


def _is_clean_paragraph(line: str) -> bool:
    return len(line.split()) >= MIN_PARAGRAPH_WORDS and not any(mark in line for mark in MARKUP_RESIDUE)


def _without_empty_headings(items: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Drop headings (level > 0) with no paragraph before the next heading of the same or higher rank."""
    return [
        item for position, item in enumerate(items) if item[0] == 0 or _has_paragraph_under(items, position)
    ]


def _has_paragraph_under(items: list[tuple[int, str]], position: int) -> bool:
    level = items[position][0]
    for next_level, _ in items[position + 1 :]:
        if next_level == 0:
            return True
        if next_level <= level:
            return False
    return False
