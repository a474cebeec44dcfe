"""Writing output files atomically (readers never see a half-written file, and a failure keeps the old one), and
reading the JSON files eecnn writes."""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from early_exit.errors import InputError


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place with the
    permissions a plain ``open`` would have given it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=path.suffix + ".tmp", delete=False) as tmp:
        try:
            write(tmp)
        except BaseException:
            os.unlink(tmp.name)
            raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)
    os.replace(tmp.name, path)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda file: file.write(text.encode()))


def write_json(path: Path, value: object) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: Path, option: str) -> dict:
    """A JSON object from ``path``, or an InputError naming the command-line ``option`` to fix."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: check {option}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not readable JSON ({err}): check {option}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} holds no JSON object: check {option}")
    return value


def file_digest(path: Path) -> str:
    """A short hash of the file's content: what names a cache computed from it."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]
