"""The Hugging Face cache and hub: where the cache is, what a repository has there, and the one-time
stage-in of a model's or a dataset's snapshot into it.

The cache layout is huggingface_hub's: ``<hub cache>/<type>s--<org>--<name>/`` with ``refs/main``
(the commit a branch resolved to), ``snapshots/<commit>/<files>`` (links into ``blobs/``). A snapshot
is staged once, where the network is (Snakemake's local rules ``prepare_model`` and
``prepare_corpus``), and every later job reads it by its commit with ``local_files_only``, so it
never opens a connection and always reads the very files that were staged.

A model's snapshot holds only what a causal LM load reads: its config, its weights (safetensors
where the repository has them, else PyTorch ``.bin``) and its tokenizer files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import re
from pathlib import Path

from ptqrepro.errors import PtqError, first_line

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
SAFETENSORS_FILES = ("model*.safetensors", "model.safetensors.index.json")
BIN_FILES = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
"""The file patterns a causal LM load reads (``transformers``' names for single and sharded weights)."""

GATED = ("meta-llama/",)
"""Hub ids (or ``org/`` prefixes) of repositories whose files need an accepted licence and a token.
A hub id not listed here may be gated too: ``is_gated`` asks the hub where it is reachable."""

TRUE = ("1", "ON", "YES", "TRUE")
"""The values that switch an ``HF_*_OFFLINE`` variable on (huggingface_hub ``constants._is_true``)."""
COMMIT = re.compile(r"^[0-9a-f]{40}$")
LOCAL_PATH = re.compile(r"^(/|~|\./|\.\./)")

TOKEN_STEPS = ("accept its licence on https://huggingface.co/{repo} with your account, then give this machine a "
               "token: `hf auth login` (stored in the Hugging Face home) or the HF_TOKEN environment variable")


def hub_cache(environ=None) -> Path:
    """The folder of huggingface_hub's cache as a job with ``environ`` sees it: ``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``
    (huggingface_hub ``constants``)."""
    environ = os.environ if environ is None else environ  # the environment at the call, not at import
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    return hf_home(environ) / "hub"


def hf_home(environ=None) -> Path:
    """The Hugging Face home a job with ``environ`` uses (``HF_HOME``, else under ``XDG_CACHE_HOME``)."""
    environ = os.environ if environ is None else environ  # the environment at the call, not at import
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser()
    return Path(environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface"


def is_local_path(location: str) -> bool:
    """Whether a model's ``hub:`` entry names a folder (it exists, or is written as a path: absolute,
    ``~``, ``./``, ``../``, or with more than one ``/``) rather than a hub id ``org/name``."""
    return Path(location).expanduser().exists() or bool(LOCAL_PATH.match(location)) or location.count("/") > 1


def repo_folder(repo_id: str, repo_type: str, cache: Path) -> Path:
    """A repository's folder in the cache (huggingface_hub ``file_download.repo_folder_name``)."""
    return cache / "--".join([f"{repo_type}s", *repo_id.split("/")])


def cached_revision(repo_id: str, repo_type: str, cache: Path, revision: str = "main") -> str | None:
    """The commit ``revision`` resolved to when the repository was last staged into ``cache``, where
    that snapshot folder exists; None: not in the cache."""
    folder = repo_folder(repo_id, repo_type, cache)
    commit = revision if COMMIT.match(revision) else None
    ref = folder / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    return commit if commit and (folder / "snapshots" / commit).is_dir() else None


def has_weights(snapshot: Path) -> bool:
    """Whether a model snapshot folder holds a config and weights a causal LM load can read."""
    names = [path.name for path in snapshot.iterdir()] if snapshot.is_dir() else []
    return "config.json" in names and any(fnmatch.fnmatch(name, pattern) for name in names
                                          for pattern in (*SAFETENSORS_FILES, *BIN_FILES))


def model_patterns(files: list[str]) -> list[str]:
    """The files of a model repository listing ``files`` to stage: config, tokenizer, and the
    safetensors weights where there are any, else the ``.bin`` ones."""
    safetensors = any(fnmatch.fnmatch(name, SAFETENSORS_FILES[0]) for name in files)
    return [*CONFIG_FILES, *TOKENIZER_FILES, *(SAFETENSORS_FILES if safetensors else BIN_FILES)]


def offline(environ=None) -> bool:
    """Whether the hub is kept off the network here: ``HF_HUB_OFFLINE`` set now, or when
    huggingface_hub was imported."""
    environ = os.environ if environ is None else environ  # the environment at the call, not at import
    from huggingface_hub import constants

    return environ.get("HF_HUB_OFFLINE", "").upper() in TRUE or bool(constants.HF_HUB_OFFLINE)


def token_available() -> bool:
    """Whether a hub token is set here: ``HF_TOKEN`` or the one ``hf auth login`` stored."""
    from huggingface_hub import get_token

    return get_token() is not None


def is_gated(repo_id: str, ask_hub: bool = False) -> bool:
    """Whether the repository needs an accepted licence and a token: listed in ``GATED``, or (with
    ``ask_hub``, where the hub answers) marked gated there."""
    if any(repo_id == entry or (entry.endswith("/") and repo_id.startswith(entry)) for entry in GATED):
        return True
    if not ask_hub or offline():
        return False
    from huggingface_hub import HfApi

    try:
        return bool(HfApi().model_info(repo_id, timeout=10).gated)
    except Exception:  # unreachable, or no such repository: the stage-in reports it
        return False


@contextlib.contextmanager
def hub_errors(what: str, token_repo: str, cache: Path):
    """The hub's refusals of a download of ``what`` (``model org/name``, ``dataset org/name``) as one
    ``PtqError`` each that says what to do: gated (the token steps for ``token_repo``), unknown or
    private, not cached while offline, any other HTTP error."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        yield
    except GatedRepoError:
        raise PtqError(f"{what} is gated: " + TOKEN_STEPS.format(repo=token_repo)) from None
    except RepositoryNotFoundError:
        raise PtqError(f"{what}: no such repository on the hub (or a private one: log in with a token)") from None
    except LocalEntryNotFoundError:
        raise PtqError(f"{what} is not in the Hugging Face cache {cache} and the hub cannot be "
                       "reached here: stage it where the network is (offline: false, HF_HUB_OFFLINE unset)") from None
    except HfHubHTTPError as error:
        raise PtqError(f"{what}: the hub refused it ({first_line(error)})") from None


def stage_model(repo_id: str, cache: Path | None = None) -> dict:
    """Download the files of a causal LM (``model_patterns``) of the hub's ``main`` once into the
    cache, or find them there when offline; return ``{revision, snapshot, files: {name: bytes}, bytes}``.
    A gated repository without access, an unknown one, or one not cached while offline is a
    ``PtqError`` that says what to do. ``cache``: the hub cache (default: ``hub_cache()``)."""
    from huggingface_hub import HfApi, snapshot_download

    cache = cache or hub_cache()
    with hub_errors(f"model {repo_id}", repo_id, cache):
        if offline():
            snapshot = snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
        else:
            info = HfApi().model_info(repo_id, files_metadata=False)
            files = [sibling.rfilename for sibling in info.siblings or []]
            snapshot = snapshot_download(repo_id, revision=info.sha, cache_dir=cache, allow_patterns=model_patterns(files))
    snapshot = Path(snapshot)
    if not has_weights(snapshot):
        raise PtqError(f"model {repo_id}: the cached snapshot {snapshot} has no config.json with weights; "
                       "stage it again where the network is")
    files = {str(path.relative_to(snapshot)): path.stat().st_size for path in sorted(snapshot.rglob("*")) if path.is_file()}
    return {"revision": snapshot.name, "snapshot": str(snapshot), "files": files, "bytes": sum(files.values())}


def staged_snapshot(repo_id: str, revision: str) -> Path:
    """The snapshot folder of ``repo_id`` at commit ``revision`` in this job's cache, found without the
    network; not there: a ``PtqError`` (the cache is not the one it was staged into)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache(), local_files_only=True))
    except LocalEntryNotFoundError:
        raise PtqError(f"model {repo_id} at revision {revision} is not in the Hugging Face cache {hub_cache()}: "
                       "run this job with the HF_HOME its model was staged into, or stage it again") from None


@functools.lru_cache(maxsize=8)
def stage_dataset(repo_id: str, patterns: tuple[str, ...] | None) -> tuple[Path, str]:
    """The local snapshot folder of a hub dataset repository holding the files matching ``patterns``
    (None: all), and its commit: downloaded from ``main`` once, or found in the cache when offline."""
    from huggingface_hub import snapshot_download

    with hub_errors(f"dataset {repo_id}", f"datasets/{repo_id}", hub_cache()):
        snapshot = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=list(patterns) if patterns else None,
                                          cache_dir=hub_cache(), local_files_only=offline()))
    missing = [pattern for pattern in patterns or () if not any(snapshot.glob(pattern))]
    if missing:
        raise PtqError(f"dataset {repo_id}: the cached snapshot {snapshot} lacks {', '.join(missing)}; "
                       "stage it again where the network is")
    return snapshot, snapshot.name


def staging_environment(staging: dict, environ=None) -> dict[str, str]:
    """The variables every job of a config with ``staging`` gets: ``HF_HOME`` from ``staging.hf_home``
    (where set), and ``HF_TOKEN_PATH`` at the token ``hf auth login`` stored under the Hugging Face
    home of ``environ`` where the new home has none, so that moving the cache keeps the login (an
    ``HF_TOKEN_PATH`` already set stays)."""
    environ = os.environ if environ is None else environ  # the environment at the call, not at import
    if not staging.get("hf_home"):
        return {}
    home = Path(staging["hf_home"]).expanduser()
    updates = {"HF_HOME": str(home)}
    login = hf_home(environ) / "token"
    if not environ.get("HF_TOKEN_PATH") and not (home / "token").is_file() and login.is_file():
        updates["HF_TOKEN_PATH"] = str(login)
    return updates
