"""JSON Lines input (prompt sets, chat data) with one-line errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .errors import UserError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; a malformed line is a UserError naming it."""
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
