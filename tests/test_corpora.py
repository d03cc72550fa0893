"""Corpus definitions and loaders: wiki-mini from the gensim dump, hub loaders against local stand-ins
of the WikiText-2 and C4 repositories, local folders, and the jsonl files they are written to."""

from __future__ import annotations

import bz2
import gzip
import html
import json
import re
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from hubcache import write_wikitext_mirror

from ptqrepro.data import corpora
from ptqrepro.data.corpora import (
    BUILTIN_CORPORA,
    DROPPED_SECTIONS,
    SPLITS,
    corpus_spec,
    gensim_wiki_dump,
    load_documents,
    parse_wiki_dump,
    read_documents,
    wiki_split_of,
    write_corpus,
)
from ptqrepro.errors import PtqError

HEADING = re.compile(r"^ ((?:= )+)(\S.*?)((?: =)+) $")


def heading_level(line: str) -> int | None:
    """Level of a WikiText-style heading line (1 for `` = T = ``), None for a paragraph line."""
    match = HEADING.match(line)
    if match is None:
        return None
    opening, closing = match.group(1).count("="), match.group(3).count("=")
    assert opening == closing, line
    return opening


def title_of(document: str) -> str:
    first = document.split("\n", 1)[0]
    assert heading_level(first) == 1, first
    return HEADING.match(first).group(2)


# --- wiki-mini from the gensim dump ----------------------------------------------------------------


@pytest.fixture(scope="module")
def wiki_mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("wiki") / "wiki-mini"
    stats = write_corpus(corpus_spec("wiki-mini"), out)
    documents = {split: read_documents(out / f"{split}.jsonl") for split in SPLITS}
    return out, stats, documents


@pytest.fixture(scope="module")
def fresh_articles():
    """A second, independent build: parse_wiki_dump is not cached."""
    return parse_wiki_dump(gensim_wiki_dump())


def dump_article_titles() -> set[str]:
    """Titles of main-namespace, non-redirect pages, read from the raw XML without the library."""
    raw = bz2.decompress(gensim_wiki_dump().read_bytes()).decode("utf-8")
    titles = set()
    for page in raw.split("<page>")[1:]:
        if "<ns>0</ns>" in page and "<redirect" not in page:
            titles.add(html.unescape(re.search(r"<title>(.*?)</title>", page).group(1)))
    return titles


def test_wiki_mini_writes_exactly_the_three_split_files(wiki_mini):
    out, stats, documents = wiki_mini
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    for split in SPLITS:
        assert stats[split] == {
            "documents": len(documents[split]),
            "characters": sum(len(d) for d in documents[split]),
        }


def test_wiki_mini_splits_are_disjoint_and_cover_all_articles(wiki_mini, fresh_articles):
    _, _, documents = wiki_mini
    titles = {split: [title_of(d) for d in documents[split]] for split in SPLITS}
    for split in SPLITS:
        assert len(set(titles[split])) == len(titles[split])
    assert not set(titles["train"]) & set(titles["validation"])
    assert not set(titles["train"]) & set(titles["test"])
    assert not set(titles["validation"]) & set(titles["test"])
    everything = set(titles["train"]) | set(titles["validation"]) | set(titles["test"])
    assert everything == {title_of(a) for a in fresh_articles}


def test_wiki_mini_split_by_article_index_is_deterministic(wiki_mini, fresh_articles):
    _, _, documents = wiki_mini
    for split in SPLITS:
        expected = [a for index, a in enumerate(fresh_articles) if wiki_split_of(index) == split]
        assert documents[split] == expected
    assert len(documents["test"]) == len(fresh_articles) // 10
    assert len(documents["validation"]) == (len(fresh_articles) + 1) // 10


def test_wiki_mini_holds_real_articles(wiki_mini):
    _, stats, documents = wiki_mini
    titles = {title_of(d) for split in SPLITS for d in documents[split]}
    assert titles <= dump_article_titles()
    assert len(titles) >= 90
    assert "Anarchism" in titles
    assert sum(s["characters"] for s in stats.values()) > 2_000_000


def test_wiki_mini_has_wikitext_layout(wiki_mini):
    _, _, documents = wiki_mini
    for document in (d for split in SPLITS for d in documents[split]):
        lines = document.split("\n")
        assert heading_level(lines[0]) == 1
        for line in lines[1:]:
            level = heading_level(line)
            if level is None:
                assert len(line.split()) >= 12, line
                assert line == line.strip() and "=" != line[:1], line
            else:
                assert level >= 2, line
                assert HEADING.match(line).group(2).lower() not in DROPPED_SECTIONS, line
        assert any(heading_level(line) is None for line in lines[1:])


def test_wiki_mini_has_no_markup_left(wiki_mini):
    _, _, documents = wiki_mini
    text = "\n".join(d for split in SPLITS for d in documents[split])
    leftovers = ("{{", "}}", "[[", "]]", "'''", "<ref", "</", "<!--", "&nbsp;")
    link_prefixes = ("Category:", "File:", "Image:", "thumb|")
    for markup in leftovers + link_prefixes:
        assert markup not in text, markup


# --- wikitext cleaning on a hand-written dump -------------------------------------------------------

ADA_WIKITEXT = """{{Infobox person
| name = Ada
| born = 1815
}}
'''Ada Example''' (born 1815) was an [[England|English]] mathematician who wrote the first published algorithm.<ref>{{cite book|title=Notes}}</ref> She is remembered as a pioneer of computing science today.
[[File:Ada.jpg|thumb|A portrait of Ada painted in her youth by an English artist of the period]]
Short line here.
<!-- a hidden comment that should never appear in the output text at all, not even in part -->
== Early life ==
Her father was the poet Lord Byron, who left England a few months after her birth in winter.
* A list item that is long enough to be a paragraph of twelve or more words
=== Education ===
She was educated privately by tutors and studied mathematics with great interest and talent.
<math>x^2 + y^2 = z^2 + a + b + c + d + e + f + g + h + i + j</math>
== Empty section ==
Too short.
== References ==
Some reference text that has more than twelve words in it for sure, really truly.
=== Sub reference ===
Another long reference paragraph that has more than twelve words inside it as well, yes.
== Legacy ==
Her notes on the engine are considered the first computer program by many later historians.{{citation needed}}[[File:Engine.png|thumb|The engine]]
{| class="wikitable"
| a cell with quite a lot of words in it so that it would count as prose
|}
[[Category:Mathematicians]]
[[de:Ada Example]]
"""

ADA_DOCUMENT = "\n".join(
    [
        " = Ada Example = ",
        "Ada Example (born 1815) was an English mathematician who wrote the first published algorithm."
        " She is remembered as a pioneer of computing science today.",
        " = = Early life = = ",
        "Her father was the poet Lord Byron, who left England a few months after her birth in winter.",
        " = = = Education = = = ",
        "She was educated privately by tutors and studied mathematics with great interest and talent.",
        " = = Legacy = = ",
        "Her notes on the engine are considered the first computer program by many later historians.",
    ]
)

LONG_PARAGRAPH = "This article paragraph has comfortably more than twelve words so that the cleaner keeps it."


def write_dump(path: Path, pages: list[tuple[str, int, str, bool]]) -> Path:
    """A MediaWiki export (.xml.bz2) of (title, namespace, wikitext, is_redirect) pages."""
    body = []
    for title, namespace, text, is_redirect in pages:
        redirect = f'<redirect title="{escape(title)}" />' if is_redirect else ""
        body.append(
            f"<page><title>{escape(title)}</title><ns>{namespace}</ns><id>1</id>{redirect}"
            f"<revision><id>2</id><text xml:space=\"preserve\">{escape(text)}</text></revision></page>"
        )
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(body) + "</mediawiki>"
    path.write_bytes(bz2.compress(xml.encode("utf-8")))
    return path


def test_parse_wiki_dump_cleans_markup_sections_and_short_lines(tmp_path):
    dump = write_dump(
        tmp_path / "dump.xml.bz2",
        [
            ("Ada Example", 0, ADA_WIKITEXT, False),
            ("Old name", 0, "#REDIRECT [[Ada Example]]", True),
            ("Talk:Ada Example", 1, LONG_PARAGRAPH, False),
            ("Stub", 0, "A stub.\n[[Category:Stubs]]", False),
        ],
    )
    assert parse_wiki_dump(dump) == [ADA_DOCUMENT]


def test_gensim_wiki_splits_by_index_of_kept_articles(tmp_path):
    pages = []
    for index in range(20):
        pages.append((f"Article {index}", 0, LONG_PARAGRAPH, False))
        pages.append((f"Redirect {index}", 0, "#REDIRECT [[Article 0]]", True))
    spec = corpus_spec("wiki-mini", {"path": str(write_dump(tmp_path / "d.xml.bz2", pages))})

    def titles(split):
        return [title_of(d) for d in load_documents(spec, split)]

    assert titles("test") == ["Article 9", "Article 19"]
    assert titles("validation") == ["Article 8", "Article 18"]
    assert titles("train") == [f"Article {i}" for i in range(20) if i % 10 < 8]


def test_missing_gensim_names_the_install_command(monkeypatch):
    real_find_spec = corpora.importlib.util.find_spec
    monkeypatch.setattr(
        corpora.importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real_find_spec(name, *a)
    )
    with pytest.raises(PtqError, match="pip install gensim"):
        gensim_wiki_dump()


# --- hub loaders against local stand-ins ------------------------------------------------------------

WIKITEXT_ROWS = {
    "train": ["", " = Train Title = \n", " first train line \n", " second train line \n"],
    "validation": ["", " = Validation Title = \n", " a validation line \n"],
    "test": ["", " = Test Title = \n", " a test line with @-@ hyphen \n", " last test line \n"],
}

C4_RECORDS = {
    "train": [f"C4 training document number {k}.\nIt has two lines." for k in range(5)],
    "validation": [f"C4 validation document {k}." for k in range(3)],
}


@pytest.fixture
def load_dataset_calls(monkeypatch, tmp_path):
    """Keep `datasets` offline and caching under tmp_path; record every load_dataset call."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    calls = []
    real_load_dataset = datasets.load_dataset

    def recording_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return real_load_dataset(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording_load_dataset)
    return calls


@pytest.fixture
def wikitext_mirror(tmp_path):
    return write_wikitext_mirror(tmp_path / "wikitext", WIKITEXT_ROWS)


@pytest.fixture
def c4_mirror(tmp_path):
    root = tmp_path / "c4"
    (root / "en").mkdir(parents=True)
    files = {"train": corpora.C4_TRAIN_SHARD, "validation": corpora.C4_VALIDATION_SHARD}
    for split, texts in C4_RECORDS.items():
        with gzip.open(root / files[split], "wt", encoding="utf-8") as stream:
            for k, text in enumerate(texts):
                record = {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{k}"}
                stream.write(json.dumps(record) + "\n")
    return root


def test_wikitext2_loads_each_split_through_load_dataset(load_dataset_calls, wikitext_mirror):
    spec = corpus_spec("wikitext2", {"path": str(wikitext_mirror)})
    for split in SPLITS:
        assert load_documents(spec, split) == WIKITEXT_ROWS[split]
    assert load_dataset_calls == [
        ((str(wikitext_mirror), "wikitext-2-raw-v1"), {"data_files": None, "split": split}) for split in SPLITS
    ]


def test_c4_passes_only_the_requested_shard_and_tests_on_validation(load_dataset_calls, c4_mirror):
    spec = corpus_spec("c4", {"path": str(c4_mirror)})
    assert load_documents(spec, "train") == C4_RECORDS["train"]
    assert load_documents(spec, "test") == C4_RECORDS["validation"]
    assert [(args, kwargs) for args, kwargs in load_dataset_calls] == [
        ((str(c4_mirror), None), {"data_files": {"train": corpora.C4_TRAIN_SHARD}, "split": "train"}),
        (
            (str(c4_mirror), None),
            {"data_files": {"validation": corpora.C4_VALIDATION_SHARD}, "split": "validation"},
        ),
    ]


def test_write_corpus_from_hub_stand_in_round_trips(load_dataset_calls, c4_mirror, tmp_path):
    stats = write_corpus(corpus_spec("c4", {"path": str(c4_mirror)}), tmp_path / "out")
    assert read_documents(tmp_path / "out" / "train.jsonl") == C4_RECORDS["train"]
    assert read_documents(tmp_path / "out" / "test.jsonl") == C4_RECORDS["validation"]
    assert stats["validation"] == {
        "documents": len(C4_RECORDS["validation"]),
        "characters": sum(len(t) for t in C4_RECORDS["validation"]),
    }
    assert len(load_dataset_calls) == 3


def test_hub_text_field_must_exist(load_dataset_calls, c4_mirror):
    spec = corpus_spec("c4", {"path": str(c4_mirror), "text_field": "body"})
    with pytest.raises(PtqError, match="'body'"):
        load_documents(spec, "validation")


# --- local folders and the jsonl format ----------------------------------------------------------


def test_local_source_reads_jsonl_field_and_whole_text_files(tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["one", "two\nlines"]) + "\n")
    (folder / "validation.txt").write_text("a whole file\nis one document\n")
    spec = corpus_spec("mine", {"source": "local", "path": str(folder), "text_field": "body"})
    assert load_documents(spec, "train") == ["one", "two\nlines"]
    assert load_documents(spec, "validation") == ["a whole file\nis one document\n"]
    with pytest.raises(PtqError, match="test.jsonl"):
        load_documents(spec, "test")


def test_read_documents_round_trips_unicode_and_newlines(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    texts = ["Ελληνικά “quotes”\n\nsecond paragraph", "", "tab\there"]
    for split in SPLITS:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    write_corpus(corpus_spec("mine", {"source": "local", "path": str(folder)}), out)
    for split in SPLITS:
        assert read_documents(out / f"{split}.jsonl") == texts
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl", "validation.jsonl"]


# --- corpus_spec -------------------------------------------------------------------------------------


def test_builtin_corpora_follow_the_reference_loaders():
    """wikitext2 and c4 as GPTQ datautils loads them (both WikiText-2 splits joined with "\\n\\n"),
    slimpajama as LQER's profiling; wiki-mini keeps the space join of the default run."""
    wikitext2, c4, slimpajama = BUILTIN_CORPORA["wikitext2"], BUILTIN_CORPORA["c4"], BUILTIN_CORPORA["slimpajama"]
    assert (wikitext2.path, wikitext2.config_name) == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert wikitext2.sampling == "concatenated"
    assert (wikitext2.train_join, wikitext2.test_join) == ("\n\n", "\n\n")
    assert c4.sampling == "documents" and c4.splits["test"] == "validation"
    assert c4.data_files == {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }
    assert c4.exact_length_documents == "keep"
    assert (slimpajama.path, slimpajama.splits, slimpajama.sampling) == ("DKYoon/SlimPajama-6B", {"train": "train"}, "chunks")
    assert slimpajama.data_files == {"train": "data/train-00000-of-00048-*.parquet"}
    assert (slimpajama.train_join, slimpajama.train_documents, slimpajama.chunk_shards, slimpajama.chunk_batch) == (
        "\n\n", 4096, 8, 1000)
    wiki_mini = BUILTIN_CORPORA["wiki-mini"]
    assert (wiki_mini.source, wiki_mini.train_join, wiki_mini.sampling) == ("gensim-wiki", " ", "concatenated")


def test_corpus_spec_applies_overrides_to_builtins():
    spec = corpus_spec("wikitext2", {"path": "/mirror", "test_join": "\n"})
    assert (spec.name, spec.path, spec.test_join) == ("wikitext2", "/mirror", "\n")
    assert spec.config_name == "wikitext-2-raw-v1"
    assert corpus_spec("c4") == BUILTIN_CORPORA["c4"]


def test_corpus_spec_defines_a_corpus_from_config():
    spec = corpus_spec("mine", {"source": "local", "path": "/data/mine", "sampling": "documents"})
    assert (spec.name, spec.source, spec.path, spec.sampling) == ("mine", "local", "/data/mine", "documents")
    assert spec.splits == {"train": "train", "validation": "validation", "test": "test"}


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("nope", None, r"unknown corpus 'nope' \(known: c4, slimpajama, wiki-mini, wikitext2"),
        ("wikitext2", {"colour": "red"}, r"unknown key 'colour'"),
        ("wikitext2", {"name": "other"}, r"unknown key 'name'"),
        ("mine", {"source": "ftp", "path": "/x"}, r"source 'ftp'"),
        ("wikitext2", {"sampling": "random"}, r"sampling 'random'"),
        ("mine", {"source": "local"}, r"corpus 'mine': source 'local' needs a 'path'"),
        ("wikitext2", {"splits": {"dev": "validation"}}, r"split 'dev'"),
        ("c4", {"exact_length_documents": "trim"}, r"exact_length_documents 'trim' is not one of keep, redraw"),
        ("slimpajama", {"train_documents": 0}, r"train_documents must be a positive integer, got 0"),
        ("slimpajama", {"chunk_shards": "8"}, r"chunk_shards must be a positive integer, got '8'"),
        ("wikitext2", {"train_join": 2}, r"train_join must be a string, got 2"),
    ],
)
def test_corpus_spec_rejects_bad_config_in_one_line(name, overrides, message):
    with pytest.raises(PtqError, match=message) as error:
        corpus_spec(name, overrides)
    assert "\n" not in str(error.value)


def test_load_documents_rejects_unknown_split():
    with pytest.raises(PtqError, match="no split 'dev'"):
        load_documents(corpus_spec("wiki-mini"), "dev")
