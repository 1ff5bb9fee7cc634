"""Which importance matrix should `windquant gguf` hand llama.cpp's quantizers? The same llama.cpp
presets, each quantized with three importance matrices made from the same calibration windows:

* ``llama-imatrix``: llama.cpp's own tool on the windows' text (E[x²] per input column);
* ``moments``: windquant's statistics, the same quantity (E[x²], from its calibration pass);
* ``gradient``: windquant's default, E_t[‖g_t‖² x_t²] / E_t[‖g_t‖²], each token weighted by the
  squared norm of the loss's gradient at the linear's output (``windquant.gguf.build.IMPORTANCE``).

Only the importance matrix differs between the three files of a preset (llama-quantize picks the
same type per tensor), so the perplexities compare the matrices alone. Every file is scored by
`llama-perplexity` (ctx 512, the first --chunks chunks) on each --texts file: WikiText-2 test and,
for text the calibration mix has no part of, an other-domain file (benchmarks/other_domain.py
writes one). Needs `make llamacpp`.

    python benchmarks/importance.py --texts ../shared/data/wikitext-2-raw/wiki.test.raw,/tmp/jargon.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchlib import command_line, invocations, load_rows, ratio_bars, save_rows, write_markdown

from windquant.config import FitConfig
from windquant.gguf import llamacpp
from windquant.gguf.build import IMPORTANCE, Workspace, calibration_statistics, source_gguf
from windquant.gguf.files import write_imatrix
from windquant.pipeline import calibration_windows
from windquant.runinfo import set_threads
from windquant.runtime.loading import load_model

KINDS = ("llama-imatrix", *IMPORTANCE)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a model spec with a GGUF (default %(default)s)")
    p.add_argument("--presets", default="IQ3_XXS,Q2_K,IQ2_M,Q4_0", help="llama-quantize file types (default %(default)s)")
    p.add_argument(
        "--texts", default="../shared/data/wikitext-2-raw/wiki.test.raw", help="comma-separated raw text files to score on"
    )
    p.add_argument("--chunks", type=int, default=100, help="llama-perplexity chunks of 512 tokens per text")
    p.add_argument("--calib", default="mix", help="calibration corpus of all three matrices (default %(default)s)")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--work", default="runs/importance", help="scratch folder (reference, matrices, GGUFs)")
    p.add_argument("--out", default="benchmarks/results/importance")
    return p.parse_args()


def importance_matrices(spec: str, fit: FitConfig, work: Path) -> tuple[Path, dict[str, Path]]:
    """The F16 reference GGUF, and the three matrices of :data:`KINDS` on ``fit``'s calibration
    windows; all written once into ``work``."""
    ws = Workspace(work / "reference", source_gguf(spec), fit)
    ws.ensure_reference(True)
    paths = {kind: work / f"imatrix-{kind}.dat" for kind in KINDS}
    if all(p.is_file() for p in paths.values()):
        return ws.reference, paths
    model, tok = load_model(spec)
    windows = calibration_windows(tok, fit, model=model)
    del model
    llamacpp.importance_matrix(ws.reference, tok, windows, paths["llama-imatrix"])
    _moments, imatrices, _fisher = calibration_statistics(spec, fit, True)
    for kind, values in imatrices.items():
        write_imatrix(paths[kind], values, f"windquant {kind} {fit.calib}", len(windows))
    return ws.reference, paths


def main() -> None:
    args = parse()
    set_threads()
    for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity"):
        if llamacpp.find_tool(tool) is None:
            sys.exit(f"benchmarks/importance.py needs {tool}; {llamacpp.BUILD_HINT}")
    out, work = Path(args.out), Path(args.work) / args.model
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    fit = FitConfig(calib=args.calib, data_dir=args.data_dir)
    texts = [Path(t) for t in args.texts.split(",") if t]
    path = out / "results.json"
    rows = load_rows(path)
    command = command_line()
    meta = {"model": args.model, "chunks": args.chunks, "calib": args.calib, "commands": invocations(path, command)}
    reference, matrices = importance_matrices(args.model, fit, work)
    for text in texts:
        key = f"reference|{text.name}"
        if key not in rows:
            ppl, err = llamacpp.perplexity(reference, text, 512, args.chunks)
            rows[key] = {"key": key, "preset": "F16", "imatrix": "–", "text": text.name, "ppl": ppl, "err": err}
            save_rows(path, rows, meta)
    for preset in args.presets.split(","):
        for kind in KINDS:
            gguf = work / f"{preset}-{kind}.gguf"
            for text in texts:
                key = f"{preset}|{kind}|{text.name}"
                if key in rows:
                    continue
                if not gguf.is_file():
                    llamacpp.quantize(reference, gguf, preset, imatrix=matrices[kind])
                start = time.perf_counter()
                ppl, err = llamacpp.perplexity(gguf, text, 512, args.chunks)
                rows[key] = {"key": key, "preset": preset, "imatrix": kind, "text": text.name, "ppl": ppl, "err": err}
                rows[key]["seconds"] = round(time.perf_counter() - start, 1)
                print(f"{key}: {ppl:.4f} ± {err:.4f}", flush=True)
                save_rows(path, rows, meta)
            gguf.unlink(missing_ok=True)
    report(rows, args, meta, out)


def report(rows: dict, args, meta: dict, out: Path) -> None:
    texts = sorted({r["text"] for r in rows.values()})
    presets = [p for p in args.presets.split(",") if any(r["preset"] == p for r in rows.values())]
    head = ["preset", "text", *(f"{k} PPL" for k in KINDS), "gradient / llama-imatrix"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = {}
    for preset in presets:
        for text in texts:
            got = {k: rows.get(f"{preset}|{k}|{text}") for k in KINDS}
            if None in got.values():
                continue
            best = min(got, key=lambda k: got[k]["ppl"])
            cells = [f"**{got[k]['ppl']:.3f}**" if k == best else f"{got[k]['ppl']:.3f}" for k in KINDS]
            ratios[(preset, text)] = got["gradient"]["ppl"] / got["llama-imatrix"]["ppl"]
            lines.append(f"| {preset} | {text} | " + " | ".join(cells) + f" | ×{ratios[(preset, text)]:.4f} |")
    refs = ", ".join(f"{t} {rows[f'reference|{t}']['ppl']:.3f}" for t in texts if f"reference|{t}" in rows)
    lower = sum(r < 1 for r in ratios.values())
    body = [
        f"# Importance matrices for llama.cpp's quantizers on {args.model}",
        "",
        f"`llama-perplexity`, ctx 512, first {args.chunks} chunks of each text; F16 reference: {refs}. "
        f"All matrices from the same {args.calib} calibration windows (64 × 256); lowest per row in bold.",
        "",
        *lines,
        "",
        f"gradient is lower than llama-imatrix on {lower} of {len(ratios)} (preset, text) pairs.",
    ]
    write_markdown(out, body, meta["commands"])
    pairs = list(ratios)
    series = {
        kind: [rows[f"{p}|{kind}|{t}"]["ppl"] / rows[f"{p}|llama-imatrix|{t}"]["ppl"] for p, t in pairs] for kind in IMPORTANCE
    }
    labels = [f"{p}\n{t}" for p, t in pairs]
    title = f"{args.model}: importance matrices, same preset and windows"
    ratio_bars(out / "importance.png", labels, series, "PPL / PPL with llama-imatrix's matrix", title)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
