"""What every side of FLHF shares beyond the config and the protocol: the configuration error,
and files written so that nothing is ever half-written (a temporary file or folder, then a rename)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A run-config key or value is not allowed; the message says which and why."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=True) + "\n")


def jsonable(value: Any) -> Any:
    """Non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def save_folder_atomically(path: Path, save: Callable[[Path], object]) -> None:
    """Call ``save(tmp_dir)``, then move ``tmp_dir`` to ``path`` (replacing it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        save(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path) -> Any:
    with path.open() as f:
        return json.load(f)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=-]{0,127}")


def plain_name(value: str, what: str) -> str:
    """``value`` if it is a plain file name (letters, digits, ``. _ - + @ =``; no ``/``, no
    ``..``, not hidden): names that arrive in messages become folders, and must stay inside
    the folder they are joined to."""
    if not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"{what}: {value!r} is not a plain folder name (letters, digits, . _ - + @ =; no '..')"
        )
    return value


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only: the file is created with mode 0600, so it is
    never readable by others, not even between its creation and a chmod."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: set it before writing
    with os.fdopen(fd, "wb") as f:
        f.write(data)
