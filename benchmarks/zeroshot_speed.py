"""Zero-shot scoring time: lm-eval's ``HFLM`` as it ships against ``SharedContextLM`` (each
document's context run once, windquant's default), on one model, same tasks, same documents.

Each repeat runs both paths back to back (the order alternates between repeats), each timed from
task loading to metrics by ``windquant.eval.zeroshot.evaluate_zeroshot``; the table gives the
median seconds, the ratio to ``HFLM`` in the same run, and both paths' accuracies (which must agree).

    python benchmarks/zeroshot_speed.py --data-dir ../shared/data --limit 150 --repeats 3 \\
        --out benchmarks/results/zeroshot_speed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import command_line, pyplot, results_folder, save_rows, write_markdown  # noqa: E402

from windquant.eval.zeroshot import evaluate_zeroshot  # noqa: E402
from windquant.runtime.loading import load_model  # noqa: E402

PATHS = {"hflm": False, "shared": True}  # row key -> evaluate_zeroshot(shared_context=...)
LABELS = {"hflm": "lm-eval HFLM (batch 8)", "shared": "SharedContextLM (windquant default)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="piqa,arc_easy")
    ap.add_argument("--data-dir", help="folder holding zeroshot/ (or piqa/, arc_easy/ ...)")
    ap.add_argument("--limit", type=int, default=150, help="documents per task (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/zeroshot_speed")
    ap.add_argument("--only-table", action="store_true", help="redraw results.md and the plot from results.json")
    args = ap.parse_args()
    out, rows = results_folder(args.out)
    if args.only_table:
        render(out, rows, json.loads((out / "results.json").read_text()))
        return
    if not args.data_dir:
        ap.error("--data-dir is required to measure (the folder holding zeroshot/)")
    tasks = args.tasks.split(",")
    model, tok = load_model(args.model)
    seconds: dict[str, list[float]] = {k: [] for k in PATHS}
    scores: dict[str, dict] = {}
    for rep in range(args.repeats):
        for key in (list(PATHS) if rep % 2 == 0 else list(PATHS)[::-1]):
            start = time.perf_counter()
            res = evaluate_zeroshot(model, tok, tasks, args.data_dir, args.limit, progress=False, shared_context=PATHS[key])
            seconds[key].append(time.perf_counter() - start)
            scores.setdefault(key, res)
            print(f"repeat {rep} {key}: {seconds[key][-1]:.1f} s {res}", flush=True)
    base = statistics.median(seconds["hflm"])
    rows = {
        key: {
            "key": key,
            "path": LABELS[key],
            "seconds": seconds[key],
            "median_s": statistics.median(seconds[key]),
            "ratio_to_hflm": statistics.median(seconds[key]) / base,
            "zeroshot": scores[key],
        }
        for key in PATHS
    }
    command = command_line()
    meta = {"model": args.model, "tasks": tasks, "limit": args.limit, "repeats": args.repeats, "command": command}
    save_rows(out / "results.json", rows, meta)
    render(out, rows, meta)


def render(out: Path, rows: dict[str, dict], meta: dict) -> None:
    tasks, limit, repeats = meta["tasks"], meta["limit"], meta["repeats"]
    head = ["path", "median s", "× HFLM", *[f"{t} acc / acc_norm" for t in tasks]]
    lines = [
        f"{meta['model']}, zero-shot {', '.join(tasks)}, first {limit} documents each, median of {repeats} repeats "
        "(task loading to metrics); both paths in one process, alternating.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows.values():
        accs = [f"{r['zeroshot'][t]['acc']:.4f} / {r['zeroshot'][t]['acc_norm']:.4f}" for t in tasks]
        lines.append(f"| {r['path']} | {r['median_s']:.1f} | ×{r['ratio_to_hflm']:.2f} | " + " | ".join(accs) + " |")
    write_markdown(out, lines, meta["command"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.barh([r["path"] for r in rows.values()], [r["median_s"] for r in rows.values()], color=["#999999", "#1f77b4"])
    ax.set_title(f"{meta['model']}: {', '.join(tasks)}, first {limit} documents each", fontsize=10)
    ax.set_xlabel(f"seconds (median of {repeats})")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "zeroshot_speed.png", dpi=120)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
