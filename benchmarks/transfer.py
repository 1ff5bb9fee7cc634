"""Policy transfer (issue 15, RAMP's claim): SAC and PPO policies trained on the source model
(SmolLM2-135M) applied zero-shot to a second family (Gemma-3-270M), against allocators fitted on
the target, at equal true bits; and the source model's own table.

    python benchmarks/transfer.py --source smollm2-135m --target gemma3-270m --budgets 2.5,3.0 \
        --episodes 40 --corpus wikitext2 --data-dir ../shared/data --max-windows 16 \
        --out benchmarks/results/transfer

Rows per budget. Source: ilp, sac, ppo (trained there; their policies are kept). Target:
uniform, heuristic, ilp, sac (trained on the target), sac zero-shot and ppo zero-shot (the
source's policies, no training episode), ppo (trained on the target), and sac zero-shot with the
projection onto the budget by the policy's own -log π instead of the sensitivity scores. PPO rows use the ``guided``
preset: the construct mode, whose per-unit policy transfers (the refine mode's moves do not).
Every plan is scored on the cache's candidates (what the proxy and the allocators see), WikiText-2
test at ``--ctx`` over the first ``--max-windows`` windows, the reference beside it. Rows already
in results.json are kept (a killed run resumes). Writes results.json, results.md, transfer.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from windquant.alloc.ppo import PPOConfig
from windquant.alloc.ppo.config import PRESETS
from windquant.alloc.sac import SACConfig
from windquant.calib.corpus import corpus_tokens, window_bos
from windquant.config import FitConfig, PlanConfig
from windquant.eval.perplexity import perplexity
from windquant.files import atomic_write_json
from windquant.pipeline import make_plan, prepare
from windquant.runinfo import Timings, peak_rss_mib, set_threads
from windquant.runtime.loading import load_model

SOURCE_ROWS = ("ilp", "sac", "ppo")
TARGET_ROWS = ("uniform", "heuristic", "sac zero-shot", "ilp", "ppo zero-shot", "sac", "ppo", "sac zero-shot (policy projection)")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="smollm2-135m", help="model the transferred policies are trained on")
    p.add_argument("--target", default="gemma3-270m", help="model they are applied to zero-shot")
    p.add_argument("--budgets", default="2.5,3.0", help="true bits per weight, comma-separated")
    p.add_argument("--episodes", type=int, default=40, help="training episodes of every sac and ppo row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default="wikitext2")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--scores", default=FitConfig().scores, help="sensitivity scores of both models (FitConfig.scores): fisher | block"
    )
    p.add_argument(
        "--source-rows", default=",".join(SOURCE_ROWS), help="source rows to run (the zero-shot rows need its sac / ppo)"
    )
    p.add_argument("--out", default="benchmarks/results/transfer")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report-only", action="store_true", help="only rewrite results.md and transfer.png from results.json")
    p.add_argument(
        "--target-rows",
        default=",".join(TARGET_ROWS),
        help="target rows to run, in this order (default: all; the Must's rows come first)",
    )
    return p.parse_args()


def rows_of(names: str) -> tuple[str, ...]:
    return tuple(r.strip() for r in names.split(",") if r.strip())


def row_config(name: str, args, work: Path, policies: dict[str, str]) -> tuple[str, object]:
    """(allocator, its config) of a row; zero-shot rows point at the source's policy file."""
    sac = SACConfig(episodes=args.episodes, work_dir=str(work))
    ppo = PPOConfig(episodes=args.episodes, work_dir=str(work), **PRESETS["guided"])
    return {
        "uniform": ("uniform", None),
        "heuristic": ("heuristic", None),
        "ilp": ("ilp", None),
        "sac": ("sac", sac),
        "ppo": ("ppo", ppo),
        "sac zero-shot": ("sac", replace(sac, policy=policies.get("sac"))),
        "ppo zero-shot": ("ppo", replace(ppo, policy=policies.get("ppo"))),
        "sac zero-shot (policy projection)": ("sac", replace(sac, policy=policies.get("sac"), projection="policy")),
    }[name]


def run_model(spec: str, rows: tuple[str, ...], args, results: dict, path: Path, policies: dict) -> dict:
    """Every row of one model at every budget; returns the policies its trained rows wrote."""
    progress = not args.quiet
    model, tok = load_model(spec)
    timings = Timings()
    prepared = prepare(
        model,
        tok,
        FitConfig(scores=args.scores, cache_dir=args.cache_dir, data_dir=args.data_dir),
        {"features", "scores"},
        timings,
        progress,
    )
    tokens, bos = corpus_tokens(tok, args.corpus, "eval", args.data_dir), window_bos(tok)
    table = results["models"].setdefault(spec, {"rows": {}})

    def wiki(requested=None):
        with torch.no_grad():
            if requested is None:
                return perplexity(model, tokens, ctx=args.ctx, max_windows=args.max_windows, progress=progress, bos_id=bos)
            with prepared.plan_weights(requested):
                return perplexity(model, tokens, ctx=args.ctx, max_windows=args.max_windows, progress=progress, bos_id=bos)

    if "reference" not in table:
        ref = wiki()
        table["reference"] = {"wiki2_ppl": ref.ppl, "windows": ref.windows, "tokens": ref.tokens, "units": len(prepared.units)}
        atomic_write_json(path, results)
    written: dict[str, dict[str, str]] = {}
    for name in rows:  # row by row, so a run stopped early has whole rows
        for budget in (float(b) for b in args.budgets.split(",")):
            key = f"{name}@{budget:g}"
            work = Path(args.out) / "runs" / spec / key.replace(" ", "_").replace("@", "_")
            kind = name.split()[0]
            if kind in ("sac", "ppo") and "zero-shot" not in name:
                written.setdefault(f"{budget:g}", {})[kind] = str(work / "policy.safetensors")
            if key in table["rows"]:
                continue
            allocator, config = row_config(name, args, work, policies.get(f"{budget:g}", {}))
            start = time.perf_counter()
            plan = make_plan(
                prepared, PlanConfig(budget, "true", allocator, seed=args.seed, allocator_config=config), timings, progress
            )
            seconds = time.perf_counter() - start
            info = plan.info.get(allocator, {})
            table["rows"][key] = {
                "row": name,
                "budget": budget,
                "true_bits": plan.true_bits,
                "allocate_seconds": seconds,
                "episodes": info.get("episodes", 0),
                "wiki2_ppl": wiki(plan.requested).ppl,
                "summary": info.get("summary", ""),
                "actions": plan.action_distribution(),
            }
            atomic_write_json(path, results)
    table["stage_seconds"] = dict(timings)
    return written


def main() -> None:
    args = parse()
    set_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    if not args.report_only:
        policies = run_model(args.source, rows_of(args.source_rows), args, results, path, {})
        gc.collect()  # the source model's tensors go before the target's load
        run_model(args.target, rows_of(args.target_rows), args, results, path, policies)
        results["settings"] = {**vars(args), "peak_rss_mib": peak_rss_mib()}
        atomic_write_json(path, results)
    write_markdown(results, args, out / "results.md")
    plot(results, args, out / "transfer.png")
    print((out / "results.md").read_text())


def write_markdown(results: dict, args, md: Path) -> None:
    budgets = [f"{float(b):g}" for b in args.budgets.split(",")]
    lines = [
        "# Policy transfer: SmolLM2-trained policies applied zero-shot (issue 15)",
        "",
        f"WikiText-2 test, ctx {args.ctx}, first {args.max_windows} windows; plans on the cache's candidates; "
        f"{args.episodes} training episodes per sac/ppo row (seed {args.seed}); ppo = the `guided` preset; sensitivity scores: {args.scores}.",
        "",
    ]
    for spec, rows in ((args.target, TARGET_ROWS), (args.source, SOURCE_ROWS)):
        table = results["models"].get(spec)
        if not table:
            continue
        ref = table["reference"]
        lines += [f"## {spec} (reference {ref['wiki2_ppl']:.2f}; {ref['units']} units)", ""]
        lines += ["| allocator | " + " | ".join(f"{b} bits: PPL (true bits) | training s" for b in budgets) + " |"]
        lines += ["|---|" + "---|---|" * len(budgets)]
        for name in rows:
            cells = []
            for b in budgets:
                r = table["rows"].get(f"{name}@{b}")
                cells += (
                    [f"{r['wiki2_ppl']:.2f} ({r['true_bits']:.3f})", f"{r['allocate_seconds']:.0f} ({r['episodes']} ep)"]
                    if r
                    else ["–", "–"]
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if "settings" in results:  # written when a run completes (a stopped run has no whole-run peak)
        lines += [f"Peak RSS of the run: {results['settings']['peak_rss_mib']:.0f} MiB.", ""]
    md.write_text("\n".join(lines))


def plot(results: dict, args, png: Path) -> None:
    from windquant.reports import pyplot

    plt = pyplot()
    budgets = [f"{float(b):g}" for b in args.budgets.split(",")]
    table = results["models"].get(args.target)
    if not table:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, b in zip(axes[0], budgets, strict=True):
        names = [n for n in TARGET_ROWS if f"{n}@{b}" in table["rows"]]
        vals = [table["rows"][f"{n}@{b}"]["wiki2_ppl"] for n in names]
        colors = ["tab:orange" if "zero-shot" in n else "tab:blue" for n in names]
        ax.barh(names, vals, color=colors)
        ax.axvline(table["reference"]["wiki2_ppl"], color="gray", linestyle="--", label="reference")
        ax.set_xscale("log")
        ax.set_title(f"{args.target} at {b} true bits (orange: zero-shot)")
        ax.set_xlabel(f"WikiText-2 PPL (first {args.max_windows} windows)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
