"""How well does the RL proxy rank plans? The paper's Table-7 check, for several proxy sizes.

Every plan is scored on 64 calibration windows of 256 tokens (the proxy's corpus) and on
WikiText-2 test (ctx 2048, first ``--max-windows`` windows), both with the cache's candidate
weights (what the proxy sees). The 8/16/32-window proxies are the first 8/16/32 of the 64 windows,
so one pass serves all four sizes. Plans: ilp, heuristic and uniform at several budgets, plus
sampled PPO plans from earlier runs' episode logs (``--ppo-logs``: plans near one budget, the
narrow band where ranking is hard).

    python benchmarks/proxy_rank.py --data-dir ../shared/data --out benchmarks/results/proxy_rank \
        --ppo-logs benchmarks/results/rl_vs_heuristic/ppo_seed0/episodes.jsonl,...

Resumes: plans already in ``results.json`` are not scored again. Writes results.json,
results.md and proxy_rank.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from benchlib import pyplot, results_folder, save_rows, write_markdown
from scipy.stats import pearsonr, spearmanr

from windquant.actions import ACTIONS
from windquant.alloc.ppo.report import read_episodes
from windquant.calib.corpus import corpus_tokens
from windquant.config import FitConfig, PlanConfig
from windquant.eval.perplexity import perplexity
from windquant.pipeline import calibration_windows, make_plan, prepare
from windquant.runtime.loading import load_model

SIZES = (8, 16, 32, 64)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ilp-budgets", default="1.8,2.0,2.25,2.5,2.75,3.0,3.5,4.0")
    p.add_argument("--heuristic-budgets", default="2.0,2.5,3.0,4.0")
    p.add_argument("--uniform-budgets", default="2.25,3.0,4.0")
    p.add_argument("--ppo-logs", default="", help="episodes.jsonl files whose sampled plans join the set")
    p.add_argument("--ppo-plans", type=int, default=6, help="sampled PPO plans taken, spread over their proxy PPL")
    p.add_argument("--proxy-len", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/proxy_rank")
    p.add_argument("--report-only", action="store_true", help="write the tables and plot from the plans already scored")
    return p.parse_args()


def ppo_plans(logs: list[Path], n: int) -> dict[str, list[float]]:
    """``n`` distinct sampled plans of the final stage, spread evenly over their proxy PPL."""
    episodes = {p: read_episodes(p) for p in logs}  # each log read once
    rows = [r | {"log": p.parent.name} for p, eps in episodes.items() for r in eps if r["target"] == eps[-1]["target"]]
    distinct = {r["plan"]: r for r in sorted(rows, key=lambda r: r["proxy_ppl"])}
    ordered = sorted(distinct.values(), key=lambda r: r["proxy_ppl"])
    if not ordered:
        return {}
    picks = [ordered[round(i * (len(ordered) - 1) / max(n - 1, 1))] for i in range(min(n, len(ordered)))]
    return {f"ppo:{r['log']}:ep{r['episode']}": [ACTIONS[int(c)] for c in r["plan"]] for r in picks}


def correlation_table(rows: list[dict]) -> list[dict]:
    wiki = [r["wiki2_ppl"] for r in rows]
    out = []
    for n in SIZES:
        proxy = [r["proxy_ppl"][str(n)] for r in rows]
        out.append({"windows": n, "tokens": n * 256, "pearson": pearsonr(proxy, wiki)[0], "spearman": spearmanr(proxy, wiki)[0]})
    return out


def main() -> None:
    args = parse()
    out, rows = results_folder(args.out)
    results = out / "results.json"
    if args.report_only:
        return report(list(rows.values()), args, out)
    model, tok = load_model(args.model)
    fit = FitConfig(cache_dir=args.cache_dir, data_dir=args.data_dir)
    prepared = prepare(model, tok, fit, {"features", "scores", "proxy"})
    windows = calibration_windows(tok, fit, max(SIZES), args.proxy_len)
    eval_tokens = corpus_tokens(tok, "wikitext2", "eval", args.data_dir)

    plans: dict[str, list[float]] = {}
    for name, budgets in (("ilp", args.ilp_budgets), ("heuristic", args.heuristic_budgets), ("uniform", args.uniform_budgets)):
        for b in (float(x) for x in budgets.split(",") if x.strip()):
            plans[f"{name}:{b:g}"] = make_plan(prepared, PlanConfig(b, "true", name), progress=False).requested
    logs = [Path(p) for p in args.ppo_logs.split(",") if p.strip()]
    plans |= ppo_plans(logs, args.ppo_plans)

    problem = prepared.problem(4.0, "true")  # its bit table prices any plan
    for key, requested in plans.items():
        if key in rows:
            continue
        with torch.no_grad(), prepared.plan_weights(requested):
            nll, tokens, seconds = 0.0, 0, {}
            start = time.perf_counter()
            proxy = {}
            for lo, hi in zip((0,) + SIZES[:-1], SIZES):  # growing prefixes: 0-8, 8-16, 16-32, 32-64
                r = perplexity(model, windows[lo:hi].reshape(-1), ctx=args.proxy_len, batch_size=8, progress=False)
                scored = r.windows * (args.proxy_len - 1)
                nll, tokens = nll + r.nll * scored, tokens + scored
                proxy[str(hi)] = math.exp(nll / tokens)
                seconds[str(hi)] = time.perf_counter() - start
            wiki = perplexity(model, eval_tokens, ctx=args.ctx, max_windows=args.max_windows, progress=False)
        true_bits = float(sum(problem.bits[i, ACTIONS.index(a)] for i, a in enumerate(requested))) / problem.n_weights
        rows[key] = {
            "key": key,
            "true_bits": true_bits,
            "proxy_ppl": proxy,
            "proxy_seconds": seconds,
            "wiki2_ppl": wiki.ppl,
            "wiki2_tokens": wiki.tokens,
        }
        save_rows(results, rows, {"settings": vars(args)})
        print(f"{key}: bits {true_bits:.3f} proxy64 {proxy['64']:.2f} wiki2 {wiki.ppl:.2f}", flush=True)

    report(list(rows.values()), args, out)


def report(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    band = [r for r in rows if abs(r["true_bits"] - 2.5) < 0.01]
    lines = [
        f"Proxy = first N of 64 calibration windows × {args.proxy_len} tokens (builtin corpus); Wiki2 = WikiText-2 test, "
        f"ctx {args.ctx}, first {args.max_windows} windows; cache candidate weights (no carry) in both.",
        "",
        "| proxy windows | tokens | seconds (median) | Pearson (all) | Spearman (all) | Pearson (2.5-bit band) | Spearman (2.5-bit band) |",
        "|---|---|---|---|---|---|---|",
    ]
    table = correlation_table(rows)
    narrow = correlation_table(band) if len(band) > 2 else [None] * len(SIZES)
    for t, b in zip(table, narrow):
        secs = statistics.median(r["proxy_seconds"][str(t["windows"])] for r in rows)
        bcells = f"{b['pearson']:.3f} | {b['spearman']:.3f}" if b else "– | –"
        lines.append(f"| {t['windows']} | {t['tokens']} | {secs:.1f} | {t['pearson']:.3f} | {t['spearman']:.3f} | {bcells} |")
    lines += [
        "",
        f"{len(rows)} distinct plans, {len(band)} of them at 2.5 true bits.",
        "",
        "| plan | true bits | proxy 8 | proxy 64 | Wiki2 |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["wiki2_ppl"]):
        lines.append(
            f"| {r['key']} | {r['true_bits']:.3f} | {r['proxy_ppl']['8']:.2f} | {r['proxy_ppl']['64']:.2f} | {r['wiki2_ppl']:.2f} |"
        )
    write_markdown(
        out,
        lines,
        "python benchmarks/proxy_rank.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v),
    )
    save_rows(
        out / "results.json", {r["key"]: r for r in rows}, {"settings": vars(args), "correlation": table, "band_2.5": narrow}
    )
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SIZES), figsize=(4 * len(SIZES), 3.6), sharey=True)
    for ax, n in zip(axes, SIZES):
        ax.scatter([r["proxy_ppl"][str(n)] for r in rows], [r["wiki2_ppl"] for r in rows], s=14)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"proxy PPL ({n}×{args.proxy_len})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("WikiText-2 PPL")
    fig.tight_layout()
    fig.savefig(out / "proxy_rank.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
