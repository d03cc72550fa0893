"""Zero-shot evaluation through lm-eval's ``vllm`` model type, on a model exported for vLLM
(``eval.zeroshot.backend: vllm``).

The tasks are those of the ``hf`` backend (``ptqrepro.eval.zeroshot``: the same local task folder,
the same staged hub tasks, the same harness settings); the model is the recipe's export for vLLM's
CPU build (``ptqrepro.export.hf_directory``: ``compressed-tensors`` with ``--target vllm-cpu``, or
``dequantized`` for a float recipe), which vLLM computes with its own kernels. vLLM pins its own
torch, so the harness runs in vLLM's environment (its python: ``eval.zeroshot.vllm_python`` or
``$PTQ_VLLM_PYTHON``), as a subprocess running ``ptqrepro/export/vllm_harness.py``; its output becomes
the same ``TaskResult`` as the ``hf`` backend's (``zeroshot.task_results``), so the results are
written, tabulated and judged the same way, with the backend, vLLM's and lm-eval's versions and
vLLM's dtype recorded. Both environments must have the same lm-eval (the tasks' definitions and
metrics are its code).

Where each could fail late, planning fails first, one line each: no python of vLLM's environment,
one that does not run or lacks vLLM or lm-eval (``harness_versions``), and a recipe whose scheme
vLLM's CPU build does not compute (``export.vllm_cpu_export_format``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ptqrepro.errors import PtqError
from ptqrepro.eval.zeroshot import TaskResult, lm_eval_version, task_results
from ptqrepro.export.hf_directory import COMPRESSED_TENSORS, vllm_cpu_export_format
from ptqrepro.runtime.io import read_json
from ptqrepro.export.vllm_check import SCORER, VLLM_PYTHON_ENV, root_cause

VLLM = "vllm"
BACKEND_SETTING = "eval.zeroshot.backend vllm"
"""How every error of the vllm backend begins: the setting that asked for it."""
HARNESS = Path(__file__).resolve().parent.parent / "export" / "vllm_harness.py"
VLLM_DTYPE_AUTO = "bfloat16"
"""vLLM's dtype where ``eval.zeroshot.dtype`` is auto: its CPU 4-bit kernel computes bfloat16 or
float16 only, and every CPU vLLM runs on computes bfloat16."""
VERSIONS_SCRIPT = ("import json, importlib.metadata as m\n"
                   "def v(name):\n"
                   "    try:\n"
                   "        return m.version(name)\n"
                   "    except m.PackageNotFoundError:\n"
                   "        return None\n"
                   "print(json.dumps({'vllm': v('vllm') or v('vllm-cpu'), 'lm-eval': v('lm_eval')}))\n")


def vllm_python(setting: str | None) -> str:
    """The python of vLLM's environment: ``setting`` (``eval.zeroshot.vllm_python``), else
    ``$PTQ_VLLM_PYTHON``; an error where neither names one."""
    python = setting or os.environ.get(VLLM_PYTHON_ENV)
    if not python:
        raise PtqError(f"{BACKEND_SETTING}: where is vLLM? set eval.zeroshot.vllm_python or {VLLM_PYTHON_ENV} "
                       "to the python of an environment with vLLM and lm-eval (docs/export.md)")
    return python


def harness_versions(python: str) -> dict:
    """The versions of vLLM and lm-eval in ``python``'s environment, read without importing them
    (a fraction of a second); an error where it does not run, lacks one of them, or has another
    lm-eval than this environment."""
    prefix = f"{BACKEND_SETTING}: {python}"
    try:
        done = subprocess.run([python, "-c", VERSIONS_SCRIPT], capture_output=True, text=True, timeout=120,
                              env=_without_pythonpath())
    except OSError as error:
        raise PtqError(f"{prefix} does not run ({error.strerror or error})") from None
    except subprocess.TimeoutExpired:
        raise PtqError(f"{prefix} did not answer within 120 s") from None
    if done.returncode != 0:
        raise PtqError(f"{prefix} does not run (exit {done.returncode}: {root_cause(done.stderr)})")
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    if versions["vllm"] is None:
        raise PtqError(f"{prefix} has no vLLM: give the python of vLLM's environment")
    ours = lm_eval_version()
    if versions["lm-eval"] is None:
        raise PtqError(f"{prefix} has no lm-eval: {python} -m pip install --no-deps lm-eval=={ours} "
                       "(and its missing dependencies: docs/export.md)")
    if versions["lm-eval"] != ours:
        raise PtqError(f"{prefix} has lm-eval {versions['lm-eval']}, ptqrepro's environment {ours}: the tasks are "
                       f"lm-eval's code, install lm-eval=={ours} there")
    return versions


def export_format(recipe: str, weight, act, low_rank: bool) -> str:
    """The export vLLM evaluates recipe ``recipe`` on (``export.vllm_cpu_export_format``), its
    refusal as a zero-shot setting's error."""
    try:
        return vllm_cpu_export_format(recipe, weight, act, low_rank)
    except PtqError as error:
        raise PtqError(f"{BACKEND_SETTING}: {error} (leave it out of eval.zeroshot.recipes, or use backend hf)") from None


def export_folder(fmt: str) -> str:
    """The name of the export folder of ``fmt`` under ``results/export/<run>/`` (workflow/rules/export.smk)."""
    return "vllm-cpu" if fmt == COMPRESSED_TENSORS else fmt


def vllm_dtype(dtype: str) -> str:
    """vLLM's dtype for ``eval.zeroshot.dtype`` (auto: ``VLLM_DTYPE_AUTO``)."""
    return VLLM_DTYPE_AUTO if dtype == "auto" else dtype


def _without_pythonpath() -> dict:
    """This environment without PYTHONPATH, which would put ptqrepro's tree before vLLM's packages."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


def evaluate_zeroshot_vllm(python: str, exported: str | Path, tasks: list[str], include_path: str | None,
                           records: dict[str, dict], batch_size: int, max_length: int, dtype: str,
                           limit: int | None, num_fewshot: int, harness: dict,
                           log: str | Path | None = None) -> tuple[dict[str, TaskResult], dict]:
    """``{task: TaskResult}`` of ``tasks`` scored by lm-eval's ``vllm`` model type on ``exported``
    in ``python``'s environment (``vllm_harness.py``; its output goes to ``log``), and what ran them:
    ``backend``, ``dtype`` (vLLM's), ``versions`` and ``version_warnings`` (the export's against
    vLLM's environment). ``records``: each task's ``task_record`` from this environment."""
    harness_versions(python)
    request = {"tasks": tasks, "include": str(Path(include_path).resolve()) if include_path else None,
               "batch_size": batch_size, "max_length": max_length, "dtype": vllm_dtype(dtype), "limit": limit,
               "num_fewshot": num_fewshot, "harness": harness}
    with tempfile.TemporaryDirectory() as tmp:
        # the scripts run apart from ptqrepro's tree, whose folder first on sys.path would shadow
        # the standard library (statistics.py)
        for script in (HARNESS, SCORER):
            shutil.copyfile(script, Path(tmp) / script.name)
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        out = Path(tmp) / "output.json"
        log_path = Path(log) if log else Path(tmp) / "vllm.log"
        command = [python, str(Path(tmp) / HARNESS.name), "--model", str(Path(exported).resolve()),
                   "--request", str(Path(tmp) / "request.json"), "--out", str(out)]
        with open(log_path, "w") as output:
            done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=tmp, env=_without_pythonpath())
        if done.returncode != 0:
            raise PtqError(f"lm-eval's vllm model could not evaluate {exported} (exit {done.returncode}): "
                           f"{root_cause(log_path.read_text())}")
        output = read_json(out)
    ran = {"backend": VLLM, "dtype": output["dtype"], "versions": output["versions"],
           "version_warnings": output["version_warnings"]}
    return task_results(output, tasks, records, num_fewshot), ran
