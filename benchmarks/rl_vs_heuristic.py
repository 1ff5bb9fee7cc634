"""The paper's Table 8 experiment on our model: heuristic (B.3), ilp and the PPO presets
(``paper``, ``guided``, ``refine``: ``windquant.alloc.ppo.config.PRESETS``) at one or more final
targets, several seeds; and the paper's Table 7 check (proxy PPL vs WikiText-2 PPL along one PPO
run) with the episode-time ratio.

    python benchmarks/rl_vs_heuristic.py --budgets 2.0,2.5 --rows heuristic,ilp,paper,refine \
        --episodes 100 --seeds 0,1,2 --corpus wikitext2 --data-dir ../shared/data --max-windows 16 \
        --out benchmarks/results/rl_refine

Everything shares one candidate fit (the cache), so allocators differ only in the plan. Plans are
evaluated as ``windquant quantize`` stores them (the stored proxy's weights: carried candidates
when the fit carries, the same weights as ``Prepared.plan_model``), and with ``--candidates-eval``
also on the cache's candidates. ``refine-frozen`` is the refine preset with ``lr=0`` (the policy
stays its prior: proposals without learning). Rows already in ``results.json`` are not recomputed
(the run resumes where it stopped). Writes results.json, results.md, curves.png and actions.png
under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from scipy.stats import pearsonr, spearmanr

from windquant.actions import ACTIONS, fmt_action
from windquant.alloc.ppo import PPOConfig
from windquant.alloc.ppo.agent import ppo_update
from windquant.alloc.ppo.config import PRESETS
from windquant.alloc.ppo.env import AllocationEnv
from windquant.alloc.ppo.report import read_episodes
from windquant.alloc.ppo.train import new_agent, new_optimizer, run_episode
from windquant.calib.corpus import corpus_tokens, window_bos
from windquant.cliflags import parse_overrides
from windquant.config import FitConfig, PlanConfig
from windquant.eval.perplexity import perplexity
from windquant.files import atomic_write_json
from windquant.pipeline import make_plan, prepare, proxy_perplexity
from windquant.runinfo import Timings, peak_rss_mib, set_threads
from windquant.runtime.loading import load_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", default="2.5", help="final targets, comma-separated")
    p.add_argument("--accounting", default="true", choices=["true", "paper"])
    p.add_argument("--episodes", type=int, default=50, help="PPO episodes per seed (paper Table 8: 50)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--rows", default="heuristic,paper,ilp", help="heuristic, ilp and PPO presets to compare ('' = only the Table-7 check)"
    )
    p.add_argument("--ppo-set", default=None, metavar="K=V,...", help="PPOConfig overrides for the ppo rows (ablations)")
    p.add_argument("--proxy-samples", type=int, default=PPOConfig.proxy_samples)
    p.add_argument("--proxy-len", type=int, default=PPOConfig.proxy_len)
    p.add_argument(
        "--calib", default=FitConfig.calib, help="calibration corpus of the candidate fit (and of the proxy's windows)"
    )
    p.add_argument("--scores", default=FitConfig.scores, help="sensitivity scores ilp (and refine's start) use: block | fisher")
    p.add_argument("--corpus", default="wikitext2")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--table7-run", default=None, help="checkpoint or PPO folder with episodes.jsonl of a long run")
    p.add_argument("--table7-every", type=int, default=10, help="episodes between Table-7 points")
    p.add_argument(
        "--table7-plans",
        choices=["best", "sampled"],
        default="best",
        help="Table-7 points: best budget-meeting plan so far (paper) or that episode's own sampled plan",
    )
    p.add_argument(
        "--candidates-eval",
        action="store_true",
        help="also score the heuristic and ilp plans on the cache's candidates (one more Wiki2 pass per row)",
    )
    p.add_argument(
        "--full-split",
        default="",
        metavar="KEY,...",
        help="rows (e.g. ilp@2,refine@2/seed2) to score as stored on the whole test split too",
    )
    p.add_argument("--timing-episodes", type=int, default=0, help="alternate N bare proxy forwards and N episodes (ratio)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/rl_vs_heuristic")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args()


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def main() -> None:
    args = parse()
    set_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": {}, "table7": []}
    progress = not args.quiet

    model, tok = load_model(args.model)
    ppo = PPOConfig(
        episodes=args.episodes,
        proxy_samples=args.proxy_samples,
        proxy_len=args.proxy_len,
        **parse_overrides(PPOConfig, args.ppo_set, "--ppo-set"),
    )
    timings = Timings()
    prepared = prepare(
        model,
        tok,
        FitConfig(calib=args.calib, scores=args.scores, cache_dir=args.cache_dir, data_dir=args.data_dir),
        {"features"},
        timings,
        progress,
    )
    heldout = ppo.proxy_windows == "heldout"  # the proxy columns use the default windows; each PPO row its own
    proxy = prepared.proxy(ppo.proxy_samples, ppo.proxy_len, heldout=heldout)
    stored = prepared.proxy(
        ppo.proxy_samples, ppo.proxy_len, stored=True, heldout=heldout
    )  # remembers carried linears across rows
    eval_tokens = corpus_tokens(tok, args.corpus, "eval", args.data_dir)

    def wiki_ppl(requested: list[float], as_stored: bool = False) -> float:
        """WikiText-2 PPL of requested actions as stored (carried when the fit carries) or on the cache's candidates."""
        with torch.no_grad(), (stored if as_stored else proxy).weights(requested):
            return perplexity(
                model, eval_tokens, ctx=args.ctx, max_windows=args.max_windows, progress=progress, bos_id=window_bos(tok)
            ).ppl

    # One bare proxy forward (reference weights, no assembly), median of 5, same process.
    bare = []
    for _ in range(5):
        start = time.perf_counter()
        proxy_perplexity(model, proxy.windows)
        bare.append(time.perf_counter() - start)
    results["bare_proxy_seconds"] = statistics.median(bare)
    if "reference" not in results["rows"]:
        with torch.no_grad():
            ref = perplexity(model, eval_tokens, ctx=args.ctx, max_windows=args.max_windows, progress=progress)
        results["rows"]["reference"] = {"wiki2_ppl": ref.ppl, "proxy_ppl": proxy.reference, "eval_tokens": ref.tokens}

    # PPO rows are presets (config.PRESETS) trained per seed; heuristic and ilp are deterministic.
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    for budget in (float(b) for b in args.budgets.split(",")):
        for name in wanted:
            for seed in seeds if name in ROW_PRESETS else [None]:
                key = f"{name}@{budget:g}" + ("" if seed is None else f"/seed{seed}")
                if key in results["rows"]:
                    continue
                results["rows"][key] = run_row(
                    prepared, (proxy, stored), ppo, args, name, budget, seed, row_dir(out, key), wiki_ppl, timings
                )
                atomic_write_json(results_path, results)

    for key in (k.strip() for k in args.full_split.split(",") if k.strip()):
        row = results["rows"][key]
        if "wiki2_full" not in row:
            requested = row_plan(prepared, row, row_dir(out, key), args.accounting)
            if abs(stored(requested) - row["proxy_ppl_stored"]) > 1e-6 * row["proxy_ppl_stored"]:
                raise SystemExit(f"{key}: the plan found does not score the row's proxy PPL; rerun the row")
            with torch.no_grad(), stored.weights(requested):
                full = perplexity(model, eval_tokens, ctx=args.ctx, progress=progress, bos_id=window_bos(tok))
            row["wiki2_full"] = {"ppl": full.ppl, "windows": full.windows, "tokens": full.tokens}
            atomic_write_json(results_path, results)
    if args.timing_episodes:
        results["timing"] = episode_timing(
            prepared, proxy, float(args.budgets.split(",")[0]), args.accounting, args.timing_episodes
        )
    if args.table7_run:
        results["table7"] = table7(
            Path(args.table7_run), prepared, wiki_ppl, args.table7_every, args.table7_plans, results.get("table7", [])
        )
        long_run = read_episodes(Path(args.table7_run) / "episodes.jsonl")
        results["long_run"] = {
            "episodes": len(long_run),
            "median_episode_seconds": statistics.median(r["seconds"] for r in long_run),
            "median_proxy_seconds": statistics.median(r["proxy_seconds"] for r in long_run),
        }
        report = Path(args.table7_run) / "run_report.json"
        if report.is_file():
            results["long_run"]["run_report_timings"] = json.loads(report.read_text())["timings"]
    results["settings"] = {
        **vars(args),
        "proxy_windows": ppo.proxy_windows,
        "peak_rss_mib": peak_rss_mib(),
        "stage_seconds": dict(timings),
    }
    atomic_write_json(results_path, results)
    write_markdown(results, out / "results.md")
    plot(results, out)
    print((out / "results.md").read_text())


def row_dir(out: Path, key: str) -> Path:
    """A row's work folder (PPO checkpoints and episode log): ``ppo@2/seed0`` -> ``ppo_2_seed0``."""
    return out / key.replace("@", "_").replace("/", "_")


def row_plan(prepared, row: dict, work: Path, accounting: str) -> list[float]:
    """The requested actions of a row: stored with it, re-made (deterministic allocators), or the
    refine run's returned plan from its episode log (the last accepted move's, ilp's if the
    validation kept it)."""
    if "plan" in row:
        return [ACTIONS[int(c)] for c in row["plan"]]
    if row["seed"] is None:
        return make_plan(prepared, PlanConfig(row["budget"], accounting, row["allocator"]), progress=False).requested
    episodes = read_episodes(work / "episodes.jsonl")
    accepted = [e for e in episodes if e["accepted"]]
    if not accepted or (row["learning"].get("validation") or {}).get("kept") == "ilp":
        return make_plan(prepared, PlanConfig(row["budget"], accounting, "ilp"), progress=False).requested
    return [ACTIONS[int(c)] for c in accepted[-1]["plan"]]


# PPO rows: the library's presets, plus the frozen-policy ablation of the refine mode.
ROW_PRESETS = PRESETS | {"refine-frozen": {**PRESETS["refine"], "lr": 0.0}}


def run_row(
    prepared, proxies, ppo: PPOConfig, args, name: str, budget: float, seed: int | None, work: Path, wiki_ppl, timings
) -> dict:
    """One allocator (or PPO preset and seed) at one budget: its plan, proxy and WikiText-2 PPL."""
    proxy, stored = proxies
    allocator = "ppo" if name in ROW_PRESETS else name
    config = replace(ppo, **ROW_PRESETS[name], work_dir=str(work)) if name in ROW_PRESETS else None
    cfg = PlanConfig(budget, args.accounting, allocator, seed=seed or 0, allocator_config=config)
    start = time.perf_counter()
    plan = make_plan(prepared, cfg, timings, progress=not args.quiet)
    row = {
        "allocator": name,
        "budget": budget,
        "seed": seed,
        "true_bits": plan.true_bits,
        "paper_bits": plan.paper_bits,
        "allocate_seconds": time.perf_counter() - start,
        "plan": "".join(str(ACTIONS.index(a)) for a in plan.requested),
        "proxy_ppl": proxy(plan.requested),  # on the cache's candidates
        "proxy_ppl_stored": stored(plan.requested),
        "wiki2_ppl_stored": wiki_ppl(plan.requested, as_stored=True),
        "actions": plan.action_distribution(),
    }
    if args.candidates_eval and seed is None:
        row["wiki2_ppl"] = wiki_ppl(plan.requested)
    if allocator == "ppo":
        row["learning"] = learning(read_episodes(work / "episodes.jsonl"), plan.info["ppo"])
    return row


def learning(episodes: list[dict], info: dict) -> dict:
    """Did the policy learn? Sampled plans early vs late, greedy vs best sample, episode time."""
    final = [e for e in episodes if e["target"] == episodes[-1]["target"]]
    first, last = final[:10], final[-10:]
    out = {
        "median_proxy_first10": statistics.median(e["proxy_ppl"] for e in first),
        "median_proxy_last10": statistics.median(e["proxy_ppl"] for e in last),
        "median_episode_seconds": statistics.median(e["seconds"] for e in episodes),
        "median_proxy_seconds": statistics.median(e["proxy_seconds"] for e in episodes),
        "greedy_proxy_ppl": info["greedy"]["proxy_ppl"],
    }
    if info.get("mode") == "refine":
        half = len(episodes) // 2
        out |= {
            "start_proxy_ppl": info["start_proxy_ppl"],
            "best_proxy_ppl": info["final_proxy_ppl"],
            "accepted_first_half": sum(e["accepted"] for e in episodes[:half]),
            "accepted_second_half": sum(e["accepted"] for e in episodes[half:]),
            "validation": info.get("validation"),
        }
    else:
        out |= {"best_proxy_ppl": info["best_sampled"]["proxy_ppl"], "chosen": info["chosen"]}
    return out


def episode_timing(prepared, proxy, target_bits: float, accounting: str, n: int) -> dict:
    """Bare proxy forward and full PPO episode (roll-out, proxy, update), alternated ``n`` times so
    both see the same machine load; medians and their ratio."""
    problem = prepared.problem(target_bits, accounting)
    cfg = PPOConfig()
    env = AllocationEnv(problem, proxy, proxy.reference, cfg)
    agent, generator = new_agent(cfg, 0), torch.Generator().manual_seed(0)
    optimizer = new_optimizer(agent, cfg)
    bare, episode = [], []
    for _ in range(n):
        start = time.perf_counter()
        proxy_perplexity(prepared.model, proxy.windows)
        mid = time.perf_counter()
        roll, _ = run_episode(env, agent, target_bits, generator)
        ppo_update(agent, optimizer, roll, cfg, generator)
        bare.append(mid - start)
        episode.append(time.perf_counter() - mid)
    b, e = statistics.median(bare), statistics.median(episode)
    return {"n": n, "median_bare_seconds": b, "median_episode_seconds": e, "ratio": e / b}


def table7(run: Path, prepared, wiki_ppl, every: int, which: str, done: list[dict]) -> list[dict]:
    """Proxy vs Wiki2 PPL every ``every`` episodes: of the best budget-meeting plan so far
    (``which="best"``, the paper's Table 7) or of that episode's sampled plan (``"sampled"``:
    distinct plans, a stronger test of the proxy)."""
    rows = read_episodes(run / "episodes.jsonl")
    final = rows[-1]["target"]
    known = {p["episode"]: p for p in done}
    points, best = [], None
    for r in rows:
        if r["avg_bits"] <= final + 1e-9 and (best is None or r["proxy_ppl"] < best["proxy_ppl"]):
            best = r
        pick = best if which == "best" else r
        if (r["episode"] + 1) % every == 0 and pick is not None:
            if r["episode"] in known:
                points.append(known[r["episode"]])
                continue
            requested = [ACTIONS[int(c)] for c in pick["plan"]]
            points.append(
                {
                    "episode": r["episode"],
                    "plan_episode": pick["episode"],
                    "true_bits": pick["true_bits"],
                    "proxy_ppl": pick["proxy_ppl"],
                    "wiki2_ppl": wiki_ppl(requested),
                }
            )
    return points


def write_markdown(results: dict, path: Path) -> None:
    s = results["settings"]
    rows = {k: r for k, r in results["rows"].items() if k != "reference"}
    lines = [
        f"Budgets {s['budgets']} {s['accounting']} bits; calibration corpus {s.get('calib', 'builtin')}; {s.get('scores', 'block')} scores; "
        f"proxy = {s['proxy_samples']}×{s['proxy_len']} calibration-corpus tokens "
        f"({s.get('proxy_windows', 'calibration')} windows); "
        f"Wiki2 = {s['corpus']} test, ctx {s['ctx']}, first {s['max_windows']} windows, as stored (carried when the fit carries), "
        "and on the cache's candidates where measured; "
        f"PPO {s['episodes']} episodes per seed. Cells are mean ± std over seeds, with the seeds' values after them.",
        "",
        "| allocator | budget | seeds | true bits | proxy PPL (candidates) | proxy PPL as stored | Wiki2 PPL as stored | per seed | Wiki2 PPL (candidates) | allocate s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = results["rows"].get("reference")
    if ref:
        lines.append(f"| reference (fp) | | | 32 | {ref['proxy_ppl']:.3f} | | {ref['wiki2_ppl']:.3f} | | | |")
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows.values():
        groups.setdefault((r["allocator"], r["budget"]), []).append(r)
    for (name, budget), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        col = lambda k, g=group: mean_std([r[k] for r in g]) if all(k in r for r in g) else ""  # noqa: E731
        seeds = ",".join(str(r["seed"]) for r in group if r["seed"] is not None)
        each = " / ".join(f"{r['wiki2_ppl_stored']:.4g}" for r in group) if len(group) > 1 else ""
        lines.append(
            f"| {name} | {budget:g} | {seeds} | {col('true_bits')} | {col('proxy_ppl')} | {col('proxy_ppl_stored')} | "
            f"{col('wiki2_ppl_stored')} | {each} | {col('wiki2_ppl')} | {col('allocate_seconds')} |"
        )
    full = [(k, r["wiki2_full"]) for k, r in rows.items() if "wiki2_full" in r]
    if full:
        lines += [
            "",
            "Whole WikiText-2 test split, as stored:",
            "",
            "| row | Wiki2 PPL | windows | tokens |",
            "|---|---|---|---|",
        ]
        lines += [f"| {k} | {f['ppl']:.3f} | {f['windows']} | {f['tokens']} |" for k, f in full]
    if "bare_proxy_seconds" in results:
        lines += ["", f"Bare proxy forward (reference weights): {results['bare_proxy_seconds']:.2f} s (median of 5)."]
    learned = [(k, r["learning"]) for k, r in rows.items() if "learning" in r]
    if learned:
        lines += [
            "",
            "Learning (final-stage episodes): median proxy PPL of the sampled plans, first 10 vs last 10; best sample vs greedy.",
            "",
            "| run | first 10 | last 10 | best | greedy | accepted moves (1st / 2nd half) | validation: ilp / refined, kept | median episode s | episode / bare forward |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, lr in learned:
            moves = f"{lr['accepted_first_half']} / {lr['accepted_second_half']}" if "accepted_first_half" in lr else ""
            v = lr.get("validation")
            checked = f"{v['ilp_ppl']:.2f} / {v['refined_ppl']:.2f}, {v['kept']}" if v else ""
            ratio = (
                lr["median_episode_seconds"] / results["bare_proxy_seconds"] if "bare_proxy_seconds" in results else float("nan")
            )
            lines.append(
                f"| {key} | {lr['median_proxy_first10']:.2f} | {lr['median_proxy_last10']:.2f} | {lr['best_proxy_ppl']:.2f} | "
                f"{lr['greedy_proxy_ppl']:.2f} | {moves} | {checked} | {lr['median_episode_seconds']:.2f} | {ratio:.2f} |"
            )
    if results.get("table7"):
        t7 = results["table7"]
        which = "best budget-meeting plan so far" if s["table7_plans"] == "best" else "the plan sampled in that episode"
        lines += ["", f"Table 7 check ({which}, along one run):", ""]
        lines += ["| episode | plan of episode | proxy PPL | Wiki2 PPL |", "|---|---|---|---|"]
        lines += [f"| {p['episode'] + 1} | {p['plan_episode'] + 1} | {p['proxy_ppl']:.3f} | {p['wiki2_ppl']:.3f} |" for p in t7]
        xs, ys = [p["proxy_ppl"] for p in t7], [p["wiki2_ppl"] for p in t7]
        if len(set(xs)) > 2:
            lines += [
                "",
                f"Pearson r = {pearsonr(xs, ys)[0]:.3f}, Spearman ρ = {spearmanr(xs, ys)[0]:.3f} over {len(t7)} points.",
            ]
    if "timing" in results:
        t = results["timing"]
        lines += [
            "",
            f"Episode time vs one bare proxy forward, alternated {t['n']}×: median episode {t['median_episode_seconds']:.2f} s, "
            f"median bare forward {t['median_bare_seconds']:.2f} s, ratio **{t['ratio']:.2f}**.",
        ]
    if "long_run" in results:
        lr = results["long_run"]
        lines += [
            "",
            f"Long run: {lr['episodes']} episodes, median episode {lr['median_episode_seconds']:.2f} s, "
            f"median proxy call {lr['median_proxy_seconds']:.2f} s, "
            f"ratio episode / bare forward = {lr['median_episode_seconds'] / results['bare_proxy_seconds']:.2f}.",
        ]
        if "run_report_timings" in lr:
            t = lr["run_report_timings"]
            lines.append(
                f"Whole `windquant quantize` run: {t['total_seconds']:.0f} s, peak RSS {t['peak_rss_mib']:.0f} MiB, stages {t['seconds']}."
            )
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, out: Path) -> None:
    if not any(k != "reference" for k in results["rows"]):
        return  # a Table-7-only run has nothing to compare
    from windquant.reports import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, r in results["rows"].items():
        log = row_dir(out, key) / "episodes.jsonl"
        if "learning" in r and log.is_file():
            eps = read_episodes(log)
            field = "incumbent_ppl" if "incumbent_ppl" in eps[0] else "proxy_ppl"
            ax.plot(
                [e["episode"] for e in eps],
                [e[field] for e in eps],
                marker=".",
                markersize=3,
                label=f"{key} ({field.split('_')[0]})",
            )
    for r in results["rows"].values():
        if r.get("allocator") == "ilp":
            ax.axhline(r.get("proxy_ppl_stored", r["proxy_ppl"]), linestyle="--", color="k", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("episode")
    ax.set_ylabel("proxy perplexity of the sampled plan")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    labels = [fmt_action(a) for a in ACTIONS]
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [k for k in results["rows"] if k != "reference"]
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        dist = results["rows"][key]["actions"]
        ax.bar([j + i * width for j in range(len(labels))], [dist.get(a, 0.0) for a in labels], width, label=key)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
    ax.set_xlabel("applied action (bits)")
    ax.set_ylabel("share of weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "actions.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
