"""envs/ptqrepro.yaml against pyproject.toml: the conda environment must run this checkout with the
dependencies pyproject.toml declares, on a Python that pyproject.toml admits.

The environment installs the package itself (editable) and lists nothing else but Python and pip,
so the dependencies come from pyproject.toml alone and cannot drift; what can go wrong is the
Python version and where the package entry points. The entry is checked the way it is used:
Snakemake copies the file to ``.snakemake/conda/<hash>.yaml`` and conda writes the pip entries
to a requirements file beside the copy and runs pip there (``conda.env.installers.pip``), with the
environment of the shell that started Snakemake in the repository root. pip itself resolves the
entry (a dry run, offline), so the test sees what pip would install.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ENV_FILE = REPO / "envs" / "ptqrepro.yaml"


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def environment() -> dict:
    return yaml.safe_load(ENV_FILE.read_text())


def conda_packages(environment: dict) -> dict[str, str]:
    """The conda dependencies as {name: version spec}."""
    packages = {}
    for entry in environment["dependencies"]:
        if isinstance(entry, str):
            name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", entry).groups()
            packages[name] = spec
    return packages


def pip_entries(environment: dict) -> list[str]:
    return next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict) and "pip" in entry)


def test_the_python_version_is_one_pyproject_admits(environment, pyproject):
    spec = conda_packages(environment)["python"]
    version = re.fullmatch(r"=(\d+\.\d+)", spec)
    assert version, f"pin one minor version as python=X.Y, not python{spec}"
    assert version.group(1) in SpecifierSet(pyproject["requires-python"]), (spec, pyproject["requires-python"])


def test_the_environment_adds_only_python_pip_and_the_package(environment):
    assert set(conda_packages(environment)) == {"python", "pip"}
    assert len(pip_entries(environment)) == 1


def test_pip_installs_this_checkout_editable_with_pyproject_dependencies(environment, pyproject, tmp_path):
    """pip, run as conda runs it on Snakemake's copy of the file, installs this very checkout
    (editable) as ``ptqrepro`` with pyproject.toml's dependencies, Python requirement and extras."""
    pytest.importorskip("setuptools", reason="pip needs the build backend to read the package offline")
    deployed = tmp_path / "workdir" / ".snakemake" / "conda"
    deployed.mkdir(parents=True)
    (deployed / "0123abcd.yaml").write_text(ENV_FILE.read_text())
    (deployed / "condaenv.requirements.txt").write_text("\n".join(pip_entries(environment)) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--no-deps",
         "--no-build-isolation", "--report", str(tmp_path / "report.json"), "-r", "condaenv.requirements.txt"],
        cwd=deployed, env={**os.environ, "PWD": str(REPO)}, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (install,) = json.loads((tmp_path / "report.json").read_text())["install"]
    assert install["download_info"] == {"url": REPO.as_uri(), "dir_info": {"editable": True}}
    metadata = install["metadata"]
    assert canonicalize_name(metadata["name"]) == canonicalize_name(pyproject["name"])
    assert metadata["requires_python"] == pyproject["requires-python"]
    requirements = [Requirement(text) for text in metadata["requires_dist"]]
    assert {str(r) for r in requirements if r.marker is None} == {str(Requirement(d)) for d in pyproject["dependencies"]}
    extras = {name: {str(Requirement(d)) for d in deps} for name, deps in pyproject.get("optional-dependencies", {}).items()}
    for extra, dependencies in extras.items():
        chosen = {str(Requirement(f"{r.name}{r.specifier}")) for r in requirements
                  if r.marker is not None and r.marker.evaluate({"extra": extra})}
        assert chosen == dependencies, extra


def test_every_job_runs_in_the_environment():
    """Every rule with a command names envs/ptqrepro.yaml as its conda environment, so that
    ``--software-deployment-method conda`` runs each job there (the path in a rule is relative to
    the file that defines the rule, as Snakemake reads it)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=REPO / "Snakefile", workdir=REPO)
        rules = {rule.name: rule for rule in workflow._workflow.rules}
    with_command = {name for name, rule in rules.items() if rule.shellcmd}
    assert {"prepare_model", "quantize", "dwr", "eval_ppl", "eval_zeroshot", "tables"} <= with_command
    for name in with_command:
        rule = rules[name]
        assert rule.conda_env, f"rule {name} has no conda directive"
        assert (Path(rule.basedir) / rule.conda_env).resolve() == ENV_FILE, name
