"""Pareto benchmark: PPL vs true bits for several allocators from one fit, ILP solve times,
and (optionally) how well the sensitivity scores predict real loss increases.

    python benchmarks/pareto.py --corpus wikitext2 --data-dir ../shared/data --max-windows 8 \
        --out benchmarks/results/pareto
    python benchmarks/pareto.py --synthetic-only          # 8B-sized solver timing only

Writes under ``--out``: results.json / results.md / pareto.png (from ``windquant sweep``),
solver.json, and validation.json when ``--validate N`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from windquant.actions import ACTIONS
from windquant.alloc.ilp import solve
from windquant.config import FitConfig, PlanConfig
from windquant.eval.perplexity import perplexity
from windquant.files import atomic_write_json
from windquant.pipeline import Prepared, calibration_windows, prepare
from windquant.runinfo import Timings
from windquant.runtime.loading import load_model
from windquant.sweep import run_sweep


def synthetic_solve_seconds(units: int = 3584, repeats: int = 3, seed: int = 0) -> dict:
    """Solve time of a random 8B-sized instance (Llama-3-8B: 32 layers x 7 linears x 16 chunks)."""
    rng = np.random.default_rng(seed)
    bits = torch.tensor([16.0, 8.08, 4.48, 3.51, 2.54, 2.15, 1.65]).repeat(units, 1) * 256 * 4096
    base = torch.tensor(rng.lognormal(0, 2, size=(units, 1)))
    cost = base * torch.tensor([0.0, 1e-4, 0.01, 0.04, 0.15, 0.3, 0.8]) * torch.tensor(rng.uniform(0.5, 1.5, (units, 7)))
    times, methods = [], []
    for target in (2.0, 2.5, 3.0)[:repeats]:
        start = time.perf_counter()
        sol = solve(cost, bits, target * 256 * 4096 * units, time_limit=60)
        times.append(time.perf_counter() - start)
        methods.append(sol.method)
    return {"units": units, "actions": 7, "median_seconds": statistics.median(times), "seconds": times, "methods": methods}


def validate(prepared: Prepared, accounting: str, plans: int, target: float, samples: int, seed: int) -> dict:
    """Predicted total score vs measured calibration-loss increase for random plans near ``target``."""
    gen = np.random.default_rng(seed)
    windows = calibration_windows(prepared.tokenizer, prepared.fit, samples, seed=seed + 1)
    tokens = windows.flatten()
    ctx = windows.shape[1]

    def nll() -> float:
        with torch.no_grad():
            return perplexity(prepared.model, tokens, ctx, progress=False).nll

    base = nll()
    problem = prepared.problem(target, accounting)
    predicted, measured = [], []
    choices = [ACTIONS.index(a) for a in (4.0, 3.0, 2.0, 1.58)]
    for _ in range(plans):
        probs = gen.dirichlet(np.ones(len(choices)))
        cols = gen.choice(choices, size=len(prepared.units), p=probs)
        predicted.append(float(sum(problem.costs[i, c] for i, c in enumerate(cols))))
        with prepared.plan_weights([ACTIONS[c] for c in cols]):
            measured.append(nll() - base)
    rho = spearmanr(predicted, measured).statistic
    return {
        "plans": plans,
        "proxy_tokens": int(tokens.numel()),
        "spearman": float(rho),
        "predicted": predicted,
        "measured": measured,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="1.8,2.0,2.25,2.5,3,4")
    ap.add_argument("--allocators", default="uniform,heuristic,ilp")
    ap.add_argument("--accounting", default="true")
    ap.add_argument("--corpus", default="builtin")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--validate", type=int, default=0, help="random plans for the score-validation check")
    ap.add_argument("--synthetic-only", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/pareto")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    solver = {"synthetic_8b": synthetic_solve_seconds()}
    print(f"synthetic 8B-sized instance: median solve {solver['synthetic_8b']['median_seconds']:.2f}s")
    if not args.synthetic_only:
        model, tok = load_model(args.model)
        budgets = [float(b) for b in args.budgets.split(",")]
        timings = Timings()
        # Scores always: the validation below needs them even when ilp is not swept.
        prepared = prepare(model, tok, FitConfig(data_dir=args.data_dir, cache_dir=args.cache_dir), {"scores"}, timings)
        allocators = dict.fromkeys(args.allocators.split(","))
        rows = run_sweep(
            prepared,
            budgets,
            allocators,
            PlanConfig(accounting=args.accounting),
            args.corpus,
            args.ctx,
            args.max_windows,
            out,
            timings,
        )
        ilp_times = [r["solve_seconds"] for r in rows if r["allocator"] == "ilp" and "solve_seconds" in r]
        solver["default_model_ilp_median_seconds"] = statistics.median(ilp_times) if ilp_times else None
        print((out / "results.md").read_text())
        if args.validate:
            result = validate(prepared, args.accounting, args.validate, 2.5, samples=16, seed=0)
            atomic_write_json(out / "validation.json", result)
            print(f"score validation: Spearman {result['spearman']:.3f} over {args.validate} random plans")
    atomic_write_json(out / "solver.json", solver)
    print(
        json.dumps(
            {k: v for k, v in solver.items() if k != "synthetic_8b"}
            | {"synthetic_8b_median_s": solver["synthetic_8b"]["median_seconds"]}
        )
    )


if __name__ == "__main__":
    main()
