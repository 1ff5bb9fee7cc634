"""Which calibration text should be the default? One row per (calibration, budget): the product's
defaults (ilp, ``--scores auto``, carried errors) with only ``--calib`` changed, each plan scored as
stored on WikiText-2 test, on texts of other domains that no calibration set draws from, and
(at ``--zs-budgets``) on PIQA and ARC-Easy. Every figure is also given as a ratio to the reference
scored on the same span in the same run. Resumable: finished rows are kept in ``results.json``.

    python benchmarks/calibration.py --calibs builtin,mix,self,mix+self --budgets 2,2.5,3,4 \\
        --other /work/jargon.txt,/work/devil.txt --out benchmarks/results/calibration
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    Evaluator,
    add_eval_args,
    command_line,
    fmt,
    invocations,
    load_rows,
    recorded_commands,
    results_folder,
    save_rows,
    write_markdown,
    zs_cell,
)

from windquant.calib.corpus import window_bos  # noqa: E402
from windquant.config import FitConfig, PlanConfig  # noqa: E402
from windquant.eval.perplexity import perplexity  # noqa: E402
from windquant.pipeline import make_plan, prepare  # noqa: E402
from windquant.runinfo import Timings  # noqa: E402
from windquant.runtime.loading import load_model  # noqa: E402


def other_domain_ppl(model, tokens: torch.Tensor, args, bos_id) -> dict:
    start = time.perf_counter()
    res = perplexity(model, tokens, ctx=args.other_ctx, max_windows=args.other_windows, bos_id=bos_id)
    print(f"  other ppl={res.ppl:.3f} ({res.windows}x{res.ctx} tokens)", flush=True)
    return {
        "ppl": res.ppl,
        "ctx": res.ctx,
        "windows": res.windows,
        "tokens": res.tokens,
        "seconds": round(time.perf_counter() - start, 1),
    }


def other_parts(args) -> dict[str, Path]:
    """Each ``--other`` text by the row key its perplexity is stored under (``other:<file stem>``)."""
    return {f"other:{Path(f).stem}": Path(f) for f in args.other.split(",") if f}


def ratio(row: dict, ref: dict, part: str) -> str:
    if part not in row or part not in ref:
        return "—"
    return f"{row[part]['ppl']:.2f} (×{row[part]['ppl'] / ref[part]['ppl']:.3f})"


def table(rows: dict[str, dict], args) -> list[str]:
    ref = rows.get("reference", {})
    w = ref.get("wiki2", {})
    others = other_parts(args)
    spans = "; ".join(
        f"{part[6:]} ({path.name}): ctx {ref.get(part, {}).get('ctx')}, {ref.get(part, {}).get('windows')} windows "
        f"({ref.get(part, {}).get('tokens')} tokens)"
        for part, path in others.items()
    )
    tasks = [t for t in args.tasks.split(",") if t]
    zeroshot = (
        f"zero-shot: {', '.join(tasks)} ({'full sets' if args.limit is None else f'first {args.limit}'}), accuracy %"
        if tasks
        else "no zero-shot"
    )
    lines = [
        f"WikiText-2 test: ctx {w.get('ctx')}, {w.get('windows')} windows ({w.get('tokens')} tokens); "
        f"other-domain texts, their first windows: {spans}; "
        f"{zeroshot}. Ratios to the reference on the same span. Prepare s: calibration, fit and scores "
        "(wall time of that run, cache state and machine load as they were).",
        "",
        "| calibration | target bits | true bits | WikiText-2 PPL (ratio) | "
        + "".join(f"{part[6:]} PPL (ratio) | " for part in others)
        + "".join(f"{t} | " for t in tasks)
        + "scores chosen | prepare s |",
        "|---|---|---|---|" + "---|" * (len(others) + len(tasks)) + "---|---|",
    ]
    for key, r in rows.items():
        zs = r.get("zeroshot") or {}
        cells = "".join(f"{zs_cell(zs.get(t), args.limit)} | " for t in tasks)
        bits = "" if key == "reference" else f"{r['budget']:g}"
        true_bits = "32" if key == "reference" else f"{r['true_bits']:.3f}"
        lines.append(
            f"| {r.get('calib', 'reference')} | {bits} | {true_bits} | {ratio(r, ref, 'wiki2')} | "
            + "".join(f"{ratio(r, ref, part)} | " for part in others)
            + cells
            + f"{r.get('scores_chosen', '')} | {fmt(r.get('prepare_seconds'), 0)} |"
        )
    return lines


def plot(rows: dict[str, dict], args, out: Path) -> None:
    from windquant.reports import pyplot

    plt = pyplot()
    ref = rows["reference"]
    parts = {"wiki2": "WikiText-2 test"} | {part: part[6:] for part in other_parts(args)}
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.2))
    for ax, (part, title) in zip(axes, parts.items()):
        for calib in dict.fromkeys(r["calib"] for k, r in rows.items() if k != "reference"):
            pts = sorted(
                (r["true_bits"], r[part]["ppl"] / ref[part]["ppl"])
                for k, r in rows.items()
                if r.get("calib") == calib and part in r
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=calib)
        ax.set_yscale("log")
        ax.set_xlabel("true bits per weight (block linears)")
        ax.set_ylabel("perplexity / reference")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibs", default="builtin,mix,self,mix+self")
    ap.add_argument("--budgets", default="2,2.5,3,4")
    ap.add_argument("--zs-budgets", default="2.5,3", help="budgets also scored zero-shot")
    ap.add_argument("--other", required=True, help="text files of other domains (never a calibration source), comma-separated")
    ap.add_argument("--other-ctx", type=int, default=512)
    ap.add_argument("--other-windows", type=int, default=None, help="windows of --other-ctx tokens per text (default: all)")
    ap.add_argument("--out", default="benchmarks/results/calibration")
    ap.add_argument("--only-table", action="store_true", help="rewrite results.md and the plot from results.json, then stop")
    add_eval_args(ap)
    args = ap.parse_args()
    out, _ = results_folder(args.out)
    path = out / "results.json"
    rows = load_rows(path)
    first_other = next(iter(other_parts(args)))
    for row in rows.values():  # rows from before several --other texts: their one text was the first
        if "other" in row:
            row[first_other] = row.pop("other")
    # Each invocation that filled the table (one --calibs / --budgets piece at a time, say).
    command = command_line(drop=("--only-table",))
    if args.only_table:
        return write_outputs(rows, args, out, recorded_commands(path) or [command])
    meta = {"args": vars(args), "commands": invocations(path, command)}
    model, tokenizer = load_model(args.model)
    evaluator = Evaluator(tokenizer, args)
    other_tokens = {
        part: torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"]) for part, path in other_parts(args).items()
    }
    bos = window_bos(tokenizer)

    def checkpoint():
        save_rows(path, rows, meta)

    ref = rows.setdefault("reference", {"key": "reference"})

    def score_others(row: dict) -> None:
        for part, tokens in other_tokens.items():
            if part not in row:
                row[part] = other_domain_ppl(model, tokens, args, bos)

    evaluator.run(model, tokenizer, ref, checkpoint=checkpoint)
    score_others(ref)
    checkpoint()
    budgets = [float(b) for b in args.budgets.split(",")]
    zs_budgets = {float(b) for b in args.zs_budgets.split(",") if b}
    for calib in [c for c in args.calibs.split(",") if c]:
        keys = [f"{calib}@{b:g}" for b in budgets]
        if all(
            k in rows
            and other_tokens.keys() <= rows[k].keys()
            and not evaluator.missing(rows[k], rows[k]["budget"] in zs_budgets)
            for k in keys
        ):
            continue
        print(f"== calibration {calib}", flush=True)
        timings = Timings()
        start = time.perf_counter()
        prepared = prepare(model, tokenizer, FitConfig(calib=calib, data_dir=args.data_dir), {"scores"}, timings)
        prepare_seconds = time.perf_counter() - start
        for budget, key in zip(budgets, keys):
            row = rows.setdefault(key, {"key": key, "calib": calib, "budget": budget})
            zs = budget in zs_budgets
            if other_tokens.keys() <= row.keys() and not evaluator.missing(row, zs):
                continue
            print(f"-- {key}", flush=True)
            plan = make_plan(prepared, PlanConfig(target_bits=budget), timings)
            row |= {
                "true_bits": plan.true_bits,
                "scores_chosen": plan.info.get("scores", {}).get("chosen", prepared.fit.scores),
                "scores_check": plan.info.get("scores"),
                "prepare_seconds": round(prepare_seconds, 1),
                "timings": timings.report(),
            }
            with torch.no_grad(), prepared.plan_model(plan):
                evaluator.run(model, tokenizer, row, zeroshot=zs, checkpoint=checkpoint)
                score_others(row)
            checkpoint()
        del prepared
    return write_outputs(rows, args, out, meta["commands"])


def write_outputs(rows: dict[str, dict], args, out: Path, commands: list[str]) -> int:
    lines = table(rows, args)
    write_markdown(out, lines, commands)
    plot(rows, args, out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
