# The functions the rules call: where a quantized model goes, a recipe's spec, wildcard patterns,
# the quantize and DWR jobs' priorities and checkpoint folders. Snakemake's lint wants them apart
# from the files that define rules.

import functools
import json
import re

from ptqrepro.models.sources import resolve_device


def quantized_artifact(path):
    """A quantized model's folder: temp() under storage.temporary_artifacts, so Snakemake deletes it
    once every job that reads it (its evaluations, a DWR search on it) has finished."""
    return temp(directory(path)) if config["storage"]["temporary_artifacts"] else directory(path)


def recipe_spec(name):
    """A recipe's entry as the quantize/dwr command reads it (ptqrepro.config.recipe_job_spec), as JSON."""
    return json.dumps(recipe_job_spec(config, name))


def one_of(names):
    """A wildcard pattern matching exactly these names (none: matches nothing)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def job_cost(name):
    """A recipe job's rough run time in calibration passes (Recipe/DwrSettings.relative_cost)."""
    entry = recipe_job_spec(config, name)
    if is_reconstruction(entry):
        return reconstruction_from_config(name, entry).settings.relative_cost(CALIB["nsamples"])
    if is_peer(entry):
        return job_cost(entry["mirrors"])
    return recipe_from_config(name, entry).relative_cost()


def longest_first(wildcards):
    """Priority of a quantize or dwr job: its cost plus that of the DWR searches waiting on it, so
    that the longest chains start first and the short evaluations (priority 0) fill the end."""
    waiting = [name for name in RECONSTRUCTIONS if config["recipes"][name]["base"] == wildcards.recipe]
    return 1 + round(10 * sum(job_cost(name) for name in [wildcards.recipe, *waiting]))


def checkpoint_dir(wildcards):
    """Where a quantize or DWR job saves its finished layers."""
    return f"results/checkpoints/{wildcards.model}/{wildcards.recipe}/s{wildcards.seed}"


def calibration_input(wildcards):
    """The calibration windows of a quantize job whose recipe reads them (none for fp16, RTN, LQER)."""
    return (
        CALIBRATION_FILE.format(model=wildcards.model, seed=wildcards.seed)
        if recipe_calibrates(config, wildcards.recipe)
        else []
    )


def calibration_arguments(wildcards):
    """The command's calibration arguments (file, batch size, dtype) for a recipe that reads
    calibration data; none for one that does not, so that they are no rerun trigger of its job.
    From the wildcards, not the job's input: Snakemake compares no param derived from the input."""
    calibration = calibration_input(wildcards)
    if not calibration:
        return ""
    return "--calibration {} --batch-size {} --dtype {}".format(
        calibration, CALIB["batch_size"], calibration_dtype(config, wildcards.recipe)
    )


@functools.cache
def device_class():
    """What the `device` param of the jobs records: the class of device they compute on, `cpu` or
    `cuda`, as config `device` resolves on this machine (`auto`: `cuda` where torch sees a GPU). A
    different spelling of the same device (`cpu` to `auto` without a GPU) reruns nothing; the
    command gets the config's own value, as a resource, and resolves it where it runs."""
    try:
        return resolve_device(config["device"]).split(":")[0]
    except PtqError:
        return config["device"]  # a GPU named that this machine lacks: the job says so where it runs
