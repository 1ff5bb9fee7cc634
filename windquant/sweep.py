"""One-run Pareto sweep: fit candidates and scores once, then plan and score every
(budget, allocator) pair by assembling weights from the cache (no refitting, no packing)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from windquant.actions import bits_name
from windquant.calib.corpus import corpus_tokens, window_bos
from windquant.config import PlanConfig, config_to_dict, settings_digest
from windquant.errors import WindquantError
from windquant.eval.perplexity import perplexity
from windquant.files import atomic_write_json
from windquant.pipeline import Prepared, make_plan
from windquant.runinfo import Timings


def run_sweep(
    prepared: Prepared,
    budgets: list[float],
    allocators: dict[str, object | None],
    base: PlanConfig,
    corpus: str,
    ctx: int,
    max_windows: int | None,
    out: Path,
    timings: Timings,
    progress: bool = True,
) -> list[dict]:
    """One row per (budget, allocator); ``allocators`` maps names to their configs (None = defaults),
    ``base`` gives the rest of each row's plan config (accounting, seed). Whatever an allocator
    needs is computed on first use (``Prepared.ensure``)."""
    out.mkdir(parents=True, exist_ok=True)
    model = prepared.model
    tokens = corpus_tokens(prepared.tokenizer, corpus, "eval", prepared.fit.data_dir)
    # Rows of an interrupted run with the same settings are kept (written after every row).
    key = {
        "cache": prepared.folder.name,
        "fit": settings_digest(prepared.fit),
        # The accounting under its bits' name ("true" for stored): rows kept before the rename still match.
        "base": settings_digest(base, {"accounting": bits_name(base.accounting)}),
        "allocators": {n: None if c is None else config_to_dict(c) for n, c in allocators.items()},
        "eval": [corpus, ctx, max_windows],
    }
    done = previous_rows(out / "results.json", key)

    def ppl():
        return perplexity(
            model, tokens, ctx=ctx, max_windows=max_windows, progress=progress, bos_id=window_bos(prepared.tokenizer)
        )

    def save() -> None:
        atomic_write_json(out / "results.json", {"key": key, "rows": rows, "timings": timings.report()})

    if (None, "reference") in done:
        rows = [done[(None, "reference")]]
        eval_tokens = rows[0]["eval_tokens"]
    else:
        with torch.no_grad(), timings.stage("eval"):
            reference = ppl()
        eval_tokens = reference.tokens
        rows = [
            {
                "allocator": "reference",
                "budget": None,
                "true_bits": 32.0,
                "paper_bits": 32.0,
                "ppl": reference.ppl,
                "eval_tokens": eval_tokens,
            }
        ]
    for budget in budgets:
        for name, allocator_config in allocators.items():
            if (budget, name) in done:
                rows.append(done[(budget, name)])
                continue
            save()
            cfg = replace(base, target_bits=budget, allocator=name, allocator_config=copy.deepcopy(allocator_config))
            row = {"allocator": name, "budget": budget, "accounting": base.accounting}
            start = time.perf_counter()
            try:
                plan = make_plan(prepared, cfg, timings, progress=progress)
            except WindquantError as exc:
                rows.append({**row, "error": str(exc)})
                continue
            row["solve_seconds"] = time.perf_counter() - start
            with torch.no_grad(), timings.stage("eval"), prepared.plan_model(plan):
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
        r |= {"corpus": corpus, "ctx": ctx, "eval_tokens": eval_tokens}
    save()
    write_table(rows, out / "results.md")
    plot(rows, out / "pareto.png")
    return rows


def previous_rows(path: Path, key: dict) -> dict[tuple[float | None, str], dict]:
    """(budget, allocator) -> the finished rows of ``path`` when it was written with ``key``."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("key") != key:
        return {}
    return {(r["budget"], r["allocator"]): r for r in saved["rows"] if "ppl" in r}


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
    from windquant.reports import pyplot

    plt = pyplot()

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
