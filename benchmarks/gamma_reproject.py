"""How much of what GAMMA learned helps: re-project a trained table with its correction scaled.

The table's costs are the sensitivity scores plus what training added (``Preferences.costs``).
This projects ``scores + k·(learned − scores)`` for each factor ``k`` (0: ilp's plan; 1: gamma's)
at each budget, with no retraining, and scores each plan as stored on WikiText-2 test (ctx 2048,
the first ``--max-windows`` windows). The correction is the one learned along the path of
``strength=1``, so ``k`` is a cheap look at the step size, not a retrained one.

    python benchmarks/gamma_reproject.py --calib wikitext2 --table ~/.cache/windquant/.../gamma/preferences-true-2-….safetensors \\
        --budgets 1.8,2.0 --factors 0,0.5,1,2 --data-dir ../shared/data --out benchmarks/results/gamma/reproject
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from windquant.actions import ACTIONS
from windquant.alloc.gamma import load_preferences
from windquant.alloc.ilp import solve
from windquant.calib.corpus import corpus_tokens, window_bos
from windquant.config import FitConfig
from windquant.errors import WindquantError
from windquant.eval.perplexity import perplexity
from windquant.files import atomic_write_json
from windquant.pipeline import prepare
from windquant.runtime.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", type=Path, required=True, help="a preferences-*.safetensors table")
    ap.add_argument("--calib", default="builtin", help="calibration corpus the table was trained with")
    ap.add_argument("--scores", default="block", help="the scores the table started from")
    ap.add_argument("--budgets", default="1.8,2.0")
    ap.add_argument("--factors", default="0,0.5,1,2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    prefs = load_preferences(args.table)
    if prefs is None:
        raise SystemExit(
            f"error: {args.table} is not a complete GAMMA table; train one with windquant quantize --allocator gamma"
        )
    model, tok = load_model()
    prepared = prepare(
        model, tok, FitConfig(calib=args.calib, scores=args.scores, data_dir=args.data_dir), needs={"scores"}, progress=False
    )
    tokens = corpus_tokens(tok, "wikitext2", "eval", args.data_dir)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        problem = prepared.problem(budget, "true")
        scores = problem.costs.double()
        if scores.shape != prefs.costs.shape:
            raise WindquantError(
                f"{args.table} has {prefs.costs.shape[0]} units, the model {scores.shape[0]}: another model or chunk size"
            )
        for k in [float(f) for f in args.factors.split(",")]:
            start = time.perf_counter()
            sol = solve(scores + k * (prefs.costs - scores), problem.bits, problem.budget)
            seconds = time.perf_counter() - start
            requested = [ACTIONS[j] for j in sol.choice]
            with torch.no_grad(), prepared.stored_weights(requested):
                ppl = perplexity(
                    model, tokens, ctx=2048, max_windows=args.max_windows, progress=False, bos_id=window_bos(tok)
                ).ppl
            true_bits = float(problem.bits[torch.arange(len(sol.choice)), sol.choice].sum()) / problem.n_weights
            rows.append({"budget": budget, "factor": k, "true_bits": true_bits, "ppl": ppl, "project_seconds": seconds})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        args.out / "results.json", {"table": args.table.name, "calib": args.calib, "max_windows": args.max_windows, "rows": rows}
    )


if __name__ == "__main__":
    main()
