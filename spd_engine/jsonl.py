"""JSON Lines input (prompt sets, chat data) with one-line errors that name the file and line; atomic writes."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; a malformed line is a UserError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary path)`` beside ``path``, then rename: readers see the old file or the new one, and a
    failed write leaves nothing behind. The temporary file is created by ``write`` itself: the usual
    permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
