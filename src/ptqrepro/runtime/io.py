"""Atomic output: every artifact is written to a temporary sibling and renamed into place.

A job killed half-way therefore never leaves a file that Snakemake would take as finished.
YAML (config files, a command's inline specs) is read by ``load_yaml``, which refuses a key
given twice in one mapping.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from ptqrepro.errors import PtqError, first_line


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and for directories (whatever the block creates at the yielded path).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        yield tmp
        _readable_as_umask_allows(tmp)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _readable_as_umask_allows(path: Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the permission bits that the process's
    umask allows a new file: a library that writes through its own temporary file (safetensors)
    leaves mode 0600, which others sharing a results folder on a cluster cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for file in [path] if path.is_file() else (entry for entry in path.rglob("*") if entry.is_file()):
        mode = stat.S_IMODE(file.stat().st_mode)
        if mode | (0o666 & ~umask) != mode:
            os.chmod(file, mode | (0o666 & ~umask))


def check_writable(path: str | os.PathLike, option: str, folder: bool = False) -> None:
    """A ``PtqError`` now, before a job's work, where ``atomic_path`` could not write ``path`` after
    it: the nearest existing folder above ``path`` (which ``atomic_path`` creates the rest of) must
    be a folder this process may write, and ``path`` must not exist as the other kind (a file where
    the output is a ``folder``, or a folder where it is a file; ``atomic_path`` replaces its kind)."""
    target = Path(path)
    if target.exists() and target.is_dir() != folder:
        have, want = ("a folder", "a file") if target.is_dir() else ("a file", "a folder")
        raise PtqError(f"{option} {path}: cannot write there (it is {have}, and the output is {want})")
    above = target.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise PtqError(f"{option} {path}: cannot write there ({above} is not a folder this process may write)")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that notes, in ``duplicates``, every key a mapping names twice (the safe
    loader keeps the last value): a recipe defined twice, or a key repeated inside one."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node, deep=False):
        first_at = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges keys that the mapping may override
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_at.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: the safe loader's own error follows
            if first is not key_node.start_mark:
                self.duplicates.append(f"duplicate key {key!r} ({_positions(first, key_node.start_mark)})")
        return super().construct_mapping(node, deep)


def _positions(first, second) -> str:
    """Two places in a YAML text, 1-based: ``line 3 and line 7``, or ``line 1, columns 2 and 15``."""
    if first.line == second.line:
        return f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"
    return f"line {first.line + 1} and line {second.line + 1}"


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML (or JSON) ``text``, refusing a key given twice in any mapping at any depth. Bad
    text is a ``PtqError`` that names ``source`` (a file, a command-line option): one line, or one
    line for each key given twice."""
    loader = _UniqueKeyLoader(text)
    try:
        value = loader.get_single_data()
    except yaml.YAMLError as error:
        raise PtqError(f"cannot parse {source}: {getattr(error, 'problem', error)}") from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise PtqError("\n".join(f"{source}: {duplicate}" for duplicate in loader.duplicates))
    return value
