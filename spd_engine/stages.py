"""Stage partition: n contiguous layer ranges covering [0, L)."""
from __future__ import annotations

from .errors import UserError


def partition_layers(num_layers: int, stages: int | None = None,
                     stage_layers: list[int] | None = None) -> list[tuple[int, int]]:
    """Split L layers into n stages. Even where L divides; otherwise the first L mod n stages get one more
    layer (30 in 4 -> 8/8/7/7). ``stage_layers`` gives the counts explicitly and must sum to L."""
    if stage_layers is not None:
        counts = list(stage_layers)
        if stages is not None and stages != len(counts):
            raise UserError(f"--stages {stages} disagrees with --stage-layers ({len(counts)} stages)")
        if any(c < 1 for c in counts) or sum(counts) != num_layers:
            raise UserError(f"--stage-layers {','.join(map(str, counts))} must be positive counts summing to "
                            f"the model's {num_layers} layers")
    else:
        if stages is None:
            raise UserError("give --stages N or --stage-layers")
        if not 1 <= stages <= num_layers:
            raise UserError(f"--stages must be in [1, {num_layers}] for this {num_layers}-layer model, got {stages}")
        base, extra = divmod(num_layers, stages)
        counts = [base + (1 if s < extra else 0) for s in range(stages)]
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def stage_layers_arg(text: str) -> list[int]:
    """The argparse type of ``--stage-layers``: '8,8,7,7' -> [8, 8, 7, 7]. Their sum is checked against the
    model later, by :func:`partition_layers`."""
    import argparse

    try:
        return parse_stage_layers(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_stage_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise UserError(f"--stage-layers must be comma-separated integers like 8,8,7,7, got '{text}'") from exc
