"""The documentation site builds with `mkdocs build --strict`: a link to a missing page or anchor,
or a docstring mkdocstrings cannot render, fails the build; and no file of the repository cites a
file outside it."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None,
    reason="mkdocs / mkdocstrings[python] not installed (pip install -e '.[test]')",
)
def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=REPO, env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "ptqrepro.methods.gptq" in api and "ptqrepro.formats.mx" in api


def test_docs_pages_in_nav():
    """Every page under docs/ is in mkdocs.yml's nav, so none is built but unreachable."""
    nav = set(re.findall(r":\s*([\w-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.M))
    pages = {page.name for page in (REPO / "docs").glob("*.md")}
    assert pages == nav


def test_no_citation_of_files_outside_the_repository():
    """Code, configs and tests cite the docs pages (docs/papers.md#magr), never design notes that
    are not in the repository."""
    outside = re.compile(r"DESIGN\.md|(?<!docs/)(?<![\w/])papers\.md")
    hits = []
    for folder in ("src", "config", "workflow", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".yaml", ".csv", ".smk", ".md"} and path.name != "test_docs.py":
                for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    if outside.search(line):
                        hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    for path in (REPO / "Snakefile", REPO / "README.md"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if outside.search(line):
                hits.append(f"{path.name}:{number}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def heading_anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as Python-Markdown's toc and GitHub both spell an ASCII
    heading: code marks dropped, lower case, punctuation removed, spaces as hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+ +(.+?) *$", page.read_text(), flags=re.M):
        text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        anchors.add(re.sub(r"[-\s]+", "-", text))
    return anchors


def test_every_citation_of_a_docs_page_names_a_page_and_heading_that_exist():
    """`docs/papers.md#magr-with-rtn-and-gptq` in a docstring, a config comment or a CSV leads to a
    page of the site and one of its headings."""
    cited = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
    broken = []
    files = [REPO / "Snakefile", REPO / "README.md", REPO / "pyproject.toml"]
    for folder in ("src", "config", "workflow", "tests", "benchmarks", "profiles"):
        files += [path for path in (REPO / folder).rglob("*") if path.suffix in {".py", ".yaml", ".csv", ".smk", ".md"}]
    for path in files:
        for page, anchor in cited.findall(path.read_text(errors="replace")):
            target = REPO / "docs" / page
            if not target.exists() or (anchor and anchor not in heading_anchors(target)):
                broken.append(f"{path.relative_to(REPO)}: docs/{page}#{anchor}")
    assert not broken, "\n".join(sorted(set(broken)))
