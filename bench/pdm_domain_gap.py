"""Held-out acceptance of a PDM per prompt domain and pipeline fill, on build-data feature caches.

    python bench/pdm_domain_gap.py --pdm spd_engine/pdms/smollm2-135m-instruct \
        --cache v4=bench/data/distill_v4 mix_v2=bench/data/distill_mix_v2 --out bench/results/pdm_domain_gap.json

Why: a PDM agrees with the target far more often on held-out conversations of its own training mix than on the
evaluation sets (fill 1: 0.42 against 0.24 for v5). Splitting that held-out figure by domain shows where the
gap comes from: templated domains whose answers repeat (inflated), or domains the evaluation has more of.
For a cache the PDM was trained on, pass the same ``--val-fraction`` and ``--seed`` as its ``train-pdm`` run
(only those held-out conversations are scored); for a cache it never saw, ``--all`` scores every conversation.
Agreement is teacher-forced (the draft against the target's own next token on the target's own answers),
exactly what train-pdm's validation reports, per fill f = 1..n. JSON out, and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from spd_engine.engine import Engine
from spd_engine.errors import UserError
from spd_engine.feature_cache import FeatureCache
from spd_engine.pdm import PDM
from spd_engine.train import CacheDistiller, cache_split


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--pdm", required=True)
    p.add_argument("--cache", nargs="+", required=True, metavar="NAME=DIR")
    p.add_argument("--all", action="store_true", help="score every conversation (caches the PDM never saw)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=96, help="conversations per domain at most")
    p.add_argument("--max-rows", type=int, default=768)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    try:
        engine = Engine.load(args.model, device="cpu", dtype="float32")
        pdm = PDM.load(args.pdm, engine.model)
        distiller = CacheDistiller(engine.model, pdm)
        results = {}
        for item in args.cache:
            name, _, root = item.partition("=")
            if not root:
                raise UserError(f"--cache wants NAME=DIR, got '{item}'")
            cache = FeatureCache(root, engine.model.config, pdm.config.anchors)
            indices = list(range(len(cache))) if args.all else cache_split(cache, args.val_fraction, args.seed)[1]
            by_domain = defaultdict(list)
            for i in indices:
                by_domain[cache.sequences[i].domain].append(i)
            results[name] = {}
            for domain, picked in sorted(by_domain.items()):
                picked = picked[: args.limit]
                val = distiller.validate_fills(cache, picked, 8, args.max_rows)  # no_grad inside
                results[name][domain] = {"conversations": len(picked), **val}
                fills = " / ".join(f"{v:.3f}" for v in val["acceptance_by_fill"].values())
                print(f"{name:>10} {domain:>14} n={len(picked):3d}  acceptance by fill {fills}", flush=True)
    except UserError as exc:
        print(f"pdm_domain_gap: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps({"pdm": args.pdm, "caches": args.cache, "all": args.all, "results": results},
                                   indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
