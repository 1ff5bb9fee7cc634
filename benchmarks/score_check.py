"""Do the sensitivity scores predict real loss? One linear at a time, per model.

For each linear of the chosen blocks, every one of its units is set to ``--action`` (the rest of
the model stays 16-bit) and the real increase of the mean NLL is measured on proxy windows of
the calibration corpus (another seed than the fit's). Beside it: what the two score kinds
predict for that change, ``fisher`` (F·tr(ΔW H ΔWᵀ), summed over the linear's units) and
``block`` (the linear's measured teacher-forced block error, ``FitConfig.scores="block"``).
The loss model is ``½ Σ c`` nats per token for either.

    python benchmarks/score_check.py --model gemma3-270m --layers 0,1,5,9,12,17 \
        --data-dir ../shared/data --out benchmarks/results/score_check/gemma3-270m

Resumes: linears already in results.json are not measured again. Writes results.json,
results.md and score_check.png (predicted vs measured, log-log).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from benchlib import command_line, pyplot, results_folder, save_rows, write_markdown
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr

from windquant.actions import ACTIONS
from windquant.config import FitConfig
from windquant.eval.perplexity import perplexity
from windquant.pipeline import calibration_windows, prepare
from windquant.runtime.loading import load_model

KINDS = ("fisher", "block")
NOISE = 0.005  # nats: linears measured below this are within the proxy's noise (some measure < 0)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="0,1,5,9,12,17", help="decoder blocks whose linears are measured")
    p.add_argument("--action", type=float, default=2.0, help="bit-width every unit of the measured linear takes")
    p.add_argument("--proxy-windows", type=int, default=8)
    p.add_argument("--proxy-len", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/score_check")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md and the plot from results.json")
    return p.parse_args()


def main() -> None:
    args = parse()
    out, rows = results_folder(args.out)
    path = out / "results.json"
    if args.report_only:
        return report(list(rows.values()), args, out)
    meta = {"model": args.model, "action": args.action, "proxy_windows": args.proxy_windows, "proxy_len": args.proxy_len}
    model, tok = load_model(args.model)
    fit = FitConfig(scores="block", cache_dir=args.cache_dir, data_dir=args.data_dir)
    prepared = prepare(model, tok, fit, {"scores"})
    # The block table is derived from the Fisher one, which stays beside it in the cache folder.
    tables = {"fisher": load_file(str(prepared.folder / "scores.safetensors"))["scores"], "block": prepared.scores}
    windows = calibration_windows(tok, fit, args.proxy_windows, args.proxy_len, seed=fit.seed + 7)

    def nll() -> float:
        with torch.no_grad():
            return perplexity(model, windows.reshape(-1), ctx=args.proxy_len, batch_size=8, progress=False).nll

    base = nll()
    col = ACTIONS.index(args.action)
    layers = {int(x) for x in args.layers.split(",")}
    linears: dict[str, list[int]] = {}
    for u in prepared.units:
        if u.layer in layers:
            linears.setdefault(u.module, []).append(u.index)
    for name, idx in linears.items():
        if name in rows:
            continue
        requested = [16.0] * len(prepared.units)
        for i in idx:
            requested[i] = args.action
        with prepared.plan_weights(requested):  # a fallback, if any, is applied as the engine would
            measured = nll() - base
        row = {"key": name, "measured": measured} | {kind: 0.5 * float(tables[kind][idx, col].sum()) for kind in KINDS}
        rows[name] = row
        save_rows(path, rows, meta)
        print(f"{name:45s} measured {measured:+.4f}  fisher {row['fisher']:.4f}  block {row['block']:.4f}", flush=True)
    report(list(rows.values()), args, out)


def report(rows: list[dict], args, out: Path) -> None:
    measured = np.array([r["measured"] for r in rows])
    lines = [
        f"# Sensitivity scores vs measured loss, {args.model}, one linear at {args.action:g} bits",
        "",
        f"Measured: increase of the mean NLL on {args.proxy_windows} x {args.proxy_len} calibration tokens "
        f"(another seed than the fit's), {len(rows)} linears. Predicted: ½ Σ c over the linear's units.",
        "",
        "| scores | Spearman | Pearson | median predicted / measured¹ | worst over-prediction¹ |",
        "|---|---|---|---|---|",
    ]
    clear = [r for r in rows if r["measured"] >= NOISE]
    for kind in KINDS:
        pred = np.array([r[kind] for r in rows])
        ratio = np.array([r[kind] / r["measured"] for r in clear])
        worst = clear[int(np.argmax(ratio))]
        lines.append(
            f"| {kind} | {spearmanr(pred, measured).statistic:.3f} | {pearsonr(pred, measured).statistic:.3f} | "
            f"{np.median(ratio):.2f} | {worst[kind]:.4f} vs {worst['measured']:.4f} ({worst['key']}) |"
        )
    lines += ["", f"¹ Over the {len(clear)} linears measured at ≥ {NOISE} nats (below it the proxy's noise dominates)."]
    lines += ["", "| linear | measured | fisher | block |", "|---|---|---|---|"]
    lines += [f"| {r['key']} | {r['measured']:+.4f} | {r['fisher']:.4f} | {r['block']:.4f} |" for r in rows]
    write_markdown(out, lines, command_line())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    floor = 1e-4
    for kind, color in zip(KINDS, ("tab:red", "tab:blue"), strict=True):
        ax.scatter(np.maximum(measured, floor), [max(r[kind], floor) for r in rows], s=12, color=color, label=kind)
    lim = [floor, max(max(r[k] for k in KINDS) for r in rows) * 1.5]
    ax.plot(lim, lim, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ΔNLL (nats/token)")
    ax.set_ylabel("predicted ½ Σ c")
    ax.set_title(f"{args.model}: one linear at {args.action:g} bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "score_check.png", dpi=120)


if __name__ == "__main__":
    main()
