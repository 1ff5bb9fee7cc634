"""One-run Pareto sweep: fit candidates and scores once, then plan and score every
(budget, allocator) pair by assembling weights from the cache (no refitting, no packing)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from windquant.calib.corpus import corpus_tokens
from windquant.config import QuantConfig
from windquant.errors import WindquantError
from windquant.eval.perplexity import perplexity
from windquant.pack.apply import plan_weights
from windquant.pipeline import NEEDS_PROXY, NEEDS_SCORES, Prepared, make_plan, prepare
from windquant.runinfo import Timings


def run_sweep(
    model: nn.Module,
    tokenizer,
    prepared: Prepared,
    budgets: list[float],
    allocators: list[str],
    corpus: str,
    ctx: int,
    max_windows: int | None,
    out: Path,
    timings: Timings,
    progress: bool = True,
) -> list[dict]:
    """``prepared`` must hold scores if an allocator needs them (see :func:`prepare_sweep`)."""
    out.mkdir(parents=True, exist_ok=True)
    config = prepared.config
    tokens = corpus_tokens(tokenizer, corpus, "eval", config.data_dir)

    def ppl() -> float:
        return perplexity(model, tokens, ctx=ctx, max_windows=max_windows, progress=progress)

    with torch.no_grad(), timings.stage("eval"):
        reference = ppl()
    rows = [{"allocator": "reference", "budget": None, "true_bits": 32.0, "paper_bits": 32.0, "ppl": reference.ppl}]
    for budget in budgets:
        for name in allocators:
            cfg = replace(config, allocator=name, target_bits=budget, uniform_action=None)
            row = {"allocator": name, "budget": budget, "accounting": config.accounting}
            start = time.perf_counter()
            try:
                plan = make_plan(prepared, cfg, progress=progress)
            except WindquantError as exc:
                rows.append({**row, "error": str(exc)})
                continue
            row["solve_seconds"] = time.perf_counter() - start
            weights = prepared.cache.weights_of(plan.applied)
            with torch.no_grad(), timings.stage("eval"), plan_weights(model, plan.units, weights):
                res = ppl()
            plan.save(out / f"plan_{name}_{budget:g}.json")
            rows.append(
                {
                    **row,
                    "true_bits": plan.true_bits,
                    "paper_bits": plan.paper_bits,
                    "ppl": res.ppl,
                    "action_distribution": plan.action_distribution(),
                }
            )
    for r in rows:
        r |= {"corpus": corpus, "ctx": ctx, "eval_tokens": reference.tokens}
    (out / "results.json").write_text(json.dumps({"rows": rows, "timings": timings.report()}, indent=1))
    write_table(rows, out / "results.md")
    plot(rows, out / "pareto.png")
    return rows


def prepare_sweep(
    model: nn.Module, tokenizer, config: QuantConfig, allocators: list[str], timings: Timings, progress: bool = True
) -> Prepared:
    """Fit once for every allocator of the sweep (with scores if any of them needs them)."""
    return prepare(
        model,
        tokenizer,
        config,
        timings,
        progress,
        need_scores=any(a in NEEDS_SCORES for a in allocators),
        need_proxy=any(a in NEEDS_PROXY for a in allocators),
    )


def write_table(rows: list[dict], path: Path) -> None:
    first = rows[0]
    lines = [
        f"PPL on {first['corpus']} (ctx {first['ctx']}, {first['eval_tokens']} tokens)",
        "",
        "| allocator | budget | true bits | paper bits | PPL |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['allocator']} | {r['budget']:g} | — | — | infeasible |")
        else:
            budget = "" if r["budget"] is None else f"{r['budget']:g}"
            lines.append(f"| {r['allocator']} | {budget} | {r['true_bits']:.3f} | {r['paper_bits']:.3f} | {r['ppl']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["allocator"] for r in rows if r["allocator"] != "reference"):
        pts = sorted((r["true_bits"], r["ppl"]) for r in rows if r["allocator"] == name and "ppl" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(rows[0]["ppl"], color="gray", linestyle="--", label="reference")
    ax.set_yscale("log")
    ax.set_xlabel("true bits per weight")
    ax.set_ylabel(f"perplexity ({rows[0]['corpus']}, ctx {rows[0]['ctx']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
