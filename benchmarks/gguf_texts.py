"""The GGUF pairs of a peers run (each llama.cpp preset and `windquant gguf` at its bits) on other
text: does the perplexity gain on WikiText-2 hold on text that is not in the calibration mix?

peers.py leaves every GGUF row's file in its ``--work`` folder (``gguf/P.gguf`` for a preset,
``gguf/windquant-P.gguf`` for windquant at its bits). This scores both files of every pair found
there with `llama-perplexity` (ctx 512, the first --chunks chunks) on each --texts file, and
tables windquant's PPL over the preset's. Rows are keyed by the file's sha256, so a file that a
later peers run rewrote is scored again. Needs `make llamacpp`; benchmarks/other_domain.py writes
other-domain texts.

    python benchmarks/gguf_texts.py --folder runs/peers/gguf --texts /tmp/jargon.txt,/tmp/devil.txt
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from benchlib import command_line, invocations, load_rows, ratio_bars, save_rows, write_markdown

from windquant.gguf import llamacpp
from windquant.runinfo import set_threads


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="a peers run's GGUF folder (its --work folder's gguf/)")
    p.add_argument("--texts", required=True, help="comma-separated text files to score every file on")
    p.add_argument("--chunks", type=int, default=100, help="llama-perplexity chunks of 512 tokens per text")
    p.add_argument("--out", default="benchmarks/results/gguf-texts")
    return p.parse_args()


def pairs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """{preset: (its GGUF, windquant's GGUF at its bits)} for every preset with both files."""
    found = {}
    for ours in sorted(folder.glob("windquant-*.gguf")):
        preset = ours.stem.removeprefix("windquant-")
        if (folder / f"{preset}.gguf").is_file():
            found[preset] = (folder / f"{preset}.gguf", ours)
    return found


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()[:16]


def main() -> None:
    args = parse()
    set_threads()
    if llamacpp.find_tool("llama-perplexity") is None:
        sys.exit(f"benchmarks/gguf_texts.py needs llama-perplexity; {llamacpp.BUILD_HINT}")
    texts = [Path(t) for t in args.texts.split(",") if t]
    if missing := [str(t) for t in texts if not t.is_file()]:
        sys.exit(f"no such text file: {', '.join(missing)} (benchmarks/other_domain.py writes one)")
    found = pairs(Path(args.folder))
    if not found:
        sys.exit(f"no preset with both P.gguf and windquant-P.gguf in {args.folder}; run peers.py --methods llamacpp first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    rows = load_rows(path)
    meta = {"chunks": args.chunks, "commands": invocations(path, command_line())}
    table = []
    for preset, files in found.items():
        digests = [sha256(gguf) for gguf in files]  # once per file, not once per text
        for text in texts:
            scored = []
            for gguf, digest in zip(files, digests):
                key = f"{digest}|{text.name}|{args.chunks}"
                if key not in rows:
                    ppl, err = llamacpp.perplexity(gguf, text, 512, args.chunks)
                    rows[key] = {"key": key, "file": gguf.name, "text": text.name, "ppl": ppl, "err": err}
                    print(f"{gguf.name} on {text.name}: {ppl:.3f} ± {err:.3f}", flush=True)
                    save_rows(path, rows, meta)
                scored.append(rows[key])
            table.append((preset, text.name, *scored))
    report(table, meta, out)


def report(table: list[tuple[str, str, dict, dict]], meta: dict, out: Path) -> None:
    head = ["preset", "text", "llama.cpp preset PPL", "windquant gguf PPL", "windquant / preset"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, text, theirs, ours in table:
        ratio = ours["ppl"] / theirs["ppl"]
        cells = [f"{theirs['ppl']:.3f} ± {theirs['err']:.3f}", f"{ours['ppl']:.3f} ± {ours['err']:.3f}", f"×{ratio:.4f}"]
        lines.append(f"| {preset} | {text} | " + " | ".join(cells) + " |")
    lower = sum(o["ppl"] < t["ppl"] for _, _, t, o in table)
    body = [
        "# GGUF pairs of the peers run on other text",
        "",
        f"`llama-perplexity`, ctx 512, first {meta['chunks']} chunks of each text (± its per-file standard error; "
        "the pairs share tokens, so their difference is tighter than the two errors suggest).",
        "",
        *lines,
        "",
        f"windquant gguf is lower on {lower} of {len(table)} (preset, text) pairs.",
    ]
    write_markdown(out, body, meta["commands"])
    labels = [f"{p}\n{t}" for p, t, _, _ in table]
    ratios = {"windquant gguf / preset": [o["ppl"] / t["ppl"] for _, _, t, o in table]}
    ratio_bars(
        out / "ratios.png",
        labels,
        ratios,
        "windquant gguf PPL / preset PPL",
        "GGUF pairs at equal bits, text outside the calibration",
    )
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
