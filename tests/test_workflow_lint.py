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


def test_the_reports_front_page_renders():
    """workflow/report/workflow.rst as `snakemake --report` renders it (Jinja with the config, then
    reStructuredText with the report's links to its panels and categories): no undefined name, no
    broken link or markup (a docutils warning fails)."""
    import jinja2
    import yaml
    from docutils.core import publish_parts

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    links = "\n\n" + "\n".join(f".. _{name}: javascript:show('{name}')" for name in ("Workflow", "Tables", "Figures"))
    text = (REPO / "workflow" / "report" / "workflow.rst").read_text() + links
    rendered = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(text).render(
        snakemake=type("Snakemake", (), {"config": config}))
    html = publish_parts(rendered, writer="html", settings_overrides={"halt_level": 2})["html_body"]
    assert "smollm2-135m" in html and "all.csv" in html and "claims.csv" in html
