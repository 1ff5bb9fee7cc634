"""Diagnostic for issue 14: re-project the default model's GAMMA table trained at 2.5 bits (it must
be in the candidate cache already: ``windquant quantize --allocator gamma --target-bits 2.5``) with
the *initial* bit price taken out (cost = −s·θ − μ₀·bits) instead of each block's trained price,
and score the plans as ``windquant sweep`` does (WikiText-2 test, ctx 2048, first 16 windows).

    python benchmarks/gamma_reproject.py 2.0,2.5,4.0 benchmarks/results/gamma/reproject_mu0.json
"""

import json
import sys
from pathlib import Path

import torch

from windquant.actions import ACTIONS
from windquant.alloc.gamma import load_preferences
from windquant.alloc.ilp import solve
from windquant.calib.corpus import corpus_tokens
from windquant.config import FitConfig, PlanConfig
from windquant.eval.perplexity import perplexity
from windquant.model.loading import load_model
from windquant.pipeline import make_plan, prepare

model, tok = load_model()
prepared = prepare(model, tok, FitConfig(), needs={"scores"}, progress=False)
f = sorted(prepared.folder.glob("gamma/preferences-true-2.5-*.safetensors"))[0]
prefs = load_preferences(f)
tokens = corpus_tokens(tok, "wikitext2", "eval", "../shared/data")
rows = []
for budget in [float(b) for b in sys.argv[1].split(",")]:
    problem = prepared.problem(budget, "true")
    costs = -prefs.scale * prefs.theta.double() - prefs.mu0 * problem.bits
    sol = solve(costs, problem.bits, problem.budget)
    plan = make_plan(prepared, PlanConfig(target_bits=budget, allocator="uniform"), progress=False)  # a Plan to fill
    plan.requested = [ACTIONS[j] for j in sol.choice]
    plan.applied = prepared.applied(plan.requested)
    with torch.no_grad(), prepared.plan_model(plan):
        ppl = perplexity(model, tokens, ctx=2048, max_windows=16, progress=False).ppl
    rows.append({"budget": budget, "true_bits": plan.true_bits, "ppl": ppl, "method": sol.method})
    print(rows[-1], flush=True)
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
