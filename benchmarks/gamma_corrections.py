"""Where a GAMMA table moved away from its scores: per decoder block, the learned correction
(relative to each unit's unquantized column) summed over the block's units, against the scores'
own total, at each low-bit action. A block whose correction is several times its scores is one
whose teacher-forced error the table trusts more than the scores.

    python benchmarks/gamma_corrections.py --table <cache>/gamma/preferences-true-2-….safetensors \\
        --scores <cache>/scores.safetensors --out benchmarks/results/gamma/s13/corrections.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from windquant.actions import ACTIONS, SKIP
from windquant.alloc.gamma import load_preferences
from windquant.files import atomic_write_json

SHOWN = (2.0, 1.58, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", type=Path, required=True, help="a preferences-*.safetensors table")
    ap.add_argument(
        "--scores", type=Path, required=True, help="the scores.safetensors the table started from (beside the candidates)"
    )
    ap.add_argument("--units-per-block", type=int, default=24, help="units per decoder block (SmolLM2 at chunk 256: 24)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    prefs = load_preferences(args.table)
    if prefs is None:
        raise SystemExit(
            f"error: {args.table} is not a complete GAMMA table; train one with windquant quantize --allocator gamma"
        )
    scores = load_file(str(args.scores))["scores"].double()
    if scores.shape != prefs.costs.shape:
        raise SystemExit(
            f"error: the table has {tuple(prefs.costs.shape)} costs, the scores {tuple(scores.shape)}: another model or chunk size"
        )
    skip = ACTIONS.index(SKIP)
    correction = (prefs.costs - scores) - (prefs.costs - scores)[:, skip : skip + 1]
    own = scores - scores[:, skip : skip + 1]
    n = args.units_per_block
    rows = []
    print("block | " + " | ".join(f"{a:g} bit: correction / score" for a in SHOWN))
    for block in range(scores.shape[0] // n):
        part = slice(block * n, (block + 1) * n)
        row = {"block": block}
        for a in SHOWN:
            col = ACTIONS.index(a)
            row[f"{a:g}"] = {"correction": float(correction[part, col].sum()), "score": float(own[part, col].sum())}
        rows.append(row)
        print(f"{block} | " + " | ".join(f"{row[f'{a:g}']['correction']:.4f} / {row[f'{a:g}']['score']:.4f}" for a in SHOWN))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"table": args.table.name, "rows": rows})


if __name__ == "__main__":
    main()
