"""The workflow is lint-clean (`snakemake --lint`) and formatted (`snakefmt --check`, its settings in
pyproject.toml's [tool.snakefmt]); a failure shows what the tool said."""

import subprocess
import sys

import pytest

from test_dag import REPO


def in_repo(*command: str) -> subprocess.CompletedProcess:
    """``python -m COMMAND`` in the repository root, its output captured."""
    return subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, cwd=REPO)


@pytest.mark.slow
def test_snakemake_lint_finds_nothing():
    """The default config's workflow (every rule file; zero-shot and, with llm-compressor, peer rules)."""
    run = in_repo("snakemake", "--lint")
    said = run.stdout + run.stderr
    assert run.returncode == 0 and "Lints for" not in said, said[-6000:]


def test_snakefmt_would_change_nothing():
    run = in_repo("snakefmt", "--config", "pyproject.toml", "--check", "--compact-diff", "Snakefile", "workflow")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
