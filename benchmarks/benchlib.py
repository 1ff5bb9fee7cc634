"""Shared helpers of the peers and report benchmarks: JSON rows with resume, peak RSS per phase,
and one evaluation (WikiText-2 PPL + zero-shot) used for every row. Threads and atomic writes
come from the library (``windquant.runinfo.set_threads``, ``windquant.files``)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch

from windquant.calib.corpus import corpus_tokens, window_bos
from windquant.eval.perplexity import LLAMACPP, perplexity
from windquant.files import atomic_write_json
from windquant.reports import pyplot  # noqa: F401  (re-exported: the benchmarks draw with it)
from windquant.runinfo import peak_rss_mib, set_threads


def load_rows(path: Path) -> dict[str, dict]:
    """Rows of a results JSON keyed by ``key`` (empty when the file does not exist yet)."""
    if not path.is_file():
        return {}
    return {r["key"]: r for r in json.loads(path.read_text())["rows"]}


def results_folder(out: str) -> tuple[Path, dict[str, dict]]:
    """A benchmark's start: torch threads set, ``out`` created; (out, the rows already in its
    results.json)."""
    set_threads()
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path, load_rows(path / "results.json")


def save_rows(path: Path, rows: dict[str, dict], meta: dict, only: set[str] | None = None) -> None:
    """Write ``rows``; with ``only``, merge just those keys into the file as it is now, so two
    processes filling different rows of one file do not drop each other's rows."""
    if only is not None:
        rows = {**load_rows(path), **{k: rows[k] for k in only if k in rows}}
    atomic_write_json(path, {**meta, "rows": list(rows.values())})


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next reading covers one phase only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def phase_peak_rss_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (the process-lifetime peak where unsupported)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(peak_rss_mib(), 1)


class Evaluator:
    """WikiText-2 test PPL (non-overlapping ``ctx`` windows) and optional zero-shot accuracy."""

    def __init__(self, tokenizer, args):
        self.args = args
        self.tasks = [t for t in (args.tasks or "").split(",") if t.strip()]
        self.tokens = corpus_tokens(tokenizer, "wikitext2", "eval", args.data_dir)
        self.bos_id = window_bos(tokenizer)
        self.raw_tokens = None  # the raw file's tokens, for llama.cpp's protocol (on first use)

    def settings(self) -> dict:
        a = self.args
        return {
            "ctx": a.ctx,
            "max_windows": a.max_windows,
            "llamacpp_windows": getattr(a, "llamacpp_windows", 0),
            "tasks": self.tasks,
            "limit": a.limit,
        }

    def missing(self, row: dict, zeroshot: bool = True) -> list[str]:
        """Which parts of ``row`` are absent or were computed under other settings
        (zero-shot parts only when ``zeroshot``)."""
        need = []
        a = self.args
        if row.get("wiki2") is None or row["wiki2"].get("ctx") != a.ctx or row["wiki2"].get("max_windows") != a.max_windows:
            need.append("wiki2")
        chunks = getattr(a, "llamacpp_windows", 0)
        if chunks and (row.get("llamacpp") or {}).get("max_windows") != chunks:
            need.append("llamacpp")
        zs = row.get("zeroshot") or {}
        documents = getattr(a, "per_document", False)
        for t in self.tasks if zeroshot else []:
            if t not in zs or zs[t].get("limit") != a.limit or (documents and "correct" not in zs[t]):
                need.append(t)
        return need

    def _perplexity(self, model, row: dict, part: str, tokens, ctx: int, max_windows: int, first: int, checkpoint) -> None:
        """``row[part]``: perplexity of ``tokens`` in windows of ``ctx`` (the first ``max_windows``),
        scored from position ``first`` on; ``checkpoint()`` after."""
        start = time.perf_counter()
        res = perplexity(model, tokens, ctx=ctx, max_windows=max_windows, bos_id=self.bos_id, first=first)
        row[part] = {
            "ppl": res.ppl,
            "ctx": res.ctx,
            "windows": res.windows,
            "tokens": res.tokens,
            "max_windows": max_windows,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if checkpoint is not None:
            checkpoint()

    def run(self, model, tokenizer, row: dict, zeroshot: bool = True, checkpoint=None) -> dict:
        """Fill the missing parts of ``row`` in place (and return it); ``checkpoint()`` is
        called after each part so a killed run keeps what it measured."""
        need = self.missing(row, zeroshot)
        a = self.args
        model.eval()
        if "wiki2" in need:
            self._perplexity(model, row, "wiki2", self.tokens, a.ctx, a.max_windows, 0, checkpoint)
            print(f"  wiki2 ppl={row['wiki2']['ppl']:.3f} ({row['wiki2']['windows']}x{row['wiki2']['ctx']} tokens)", flush=True)
        if "llamacpp" in need:
            if self.raw_tokens is None:
                self.raw_tokens = corpus_tokens(tokenizer, "wikitext2", "eval", a.data_dir, raw=True)
            ctx = LLAMACPP.ctx
            self._perplexity(model, row, "llamacpp", self.raw_tokens, ctx, a.llamacpp_windows, ctx // 2, checkpoint)
            print(
                f"  llama.cpp protocol ppl={row['llamacpp']['ppl']:.3f} ({row['llamacpp']['windows']} chunks of {ctx}, second halves)",
                flush=True,
            )
        tasks = [t for t in self.tasks if t in need]
        if tasks:
            from windquant.eval.zeroshot import evaluate_zeroshot, macro_average, result_line

            start = time.perf_counter()
            with torch.no_grad():
                results = evaluate_zeroshot(model, tokenizer, tasks, a.zeroshot_dir, a.limit, per_document=True)
            seconds = round(time.perf_counter() - start, 1)
            zs = row.setdefault("zeroshot", {})
            for t, r in results.items():
                zs[t] = {**r, "limit": a.limit, "seconds": seconds}
                print("  " + result_line(t, r), flush=True)
            row["zeroshot_avg"] = macro_average({t: zs[t] for t in self.tasks if t in zs})
        return row


def add_eval_args(ap) -> None:
    ap.add_argument("--data-dir", default="/work/shared/data", help="folder holding WikiText-2 raw (default %(default)s)")
    ap.add_argument("--ctx", type=int, default=2048, help="perplexity context (default %(default)s)")
    ap.add_argument("--max-windows", type=int, default=8, help="WikiText-2 test windows of --ctx tokens (default %(default)s)")
    ap.add_argument(
        "--llamacpp-windows",
        type=int,
        default=0,
        help="also llama.cpp's protocol (ctx 512, second halves) on this many chunks; 0 skips it",
    )
    ap.add_argument("--tasks", default="piqa,arc_easy", help="zero-shot tasks, comma-separated; '' skips zero-shot")
    ap.add_argument("--zeroshot-dir", default="/work/shared/data/zeroshot", help="zero-shot data folder (default %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="examples per zero-shot task (default: the full set)")
    ap.add_argument(
        "--per-document",
        action="store_true",
        help="re-score the zero-shot tasks of rows stored without per-document results (what a paired difference needs)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default $WINDQUANT_THREADS or every core)")


def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def zs_cell(result: dict | None, limit: int | None) -> str:
    """Accuracy in %, with its n when the row was scored on another subset than the table's."""
    if result is None:
        return "–"
    other = f" (n={result['n']})" if result.get("limit") != limit else ""
    return fmt(100 * result["acc"], 1) + other


def rss_mib(field: str = "VmRSS") -> float:
    """This process's current RSS (or another /proc/self/status field, e.g. VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_mode_workers(script: str, modes: list[str], flags: dict) -> list[dict]:
    """Run ``script --worker MODE --k=v ...`` once per mode, each in its own process (RSS is per
    process), and return the JSON row each prints last."""
    import subprocess
    import sys

    rows = []
    for mode in modes:
        print(f"{mode} ...", file=sys.stderr)
        cmd = [sys.executable, script, "--worker", mode] + [f"--{k}={v}" for k, v in flags.items() if v is not None]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def recorded_commands(json_path: Path) -> list[str]:
    """The commands a resumable results JSON records as having filled it (a run may be filled in
    pieces, one option at a time)."""
    return json.loads(json_path.read_text()).get("commands", []) if json_path.is_file() else []


def command_line(drop: tuple[str, ...] = ()) -> str:
    """The command that is running, as one would retype it from the project root (arguments
    shell-quoted; those in ``drop`` left out): what a results file records beside its figures."""
    script = Path(sys.argv[0])
    if script.is_absolute() and script.is_relative_to(Path.cwd()):
        script = script.relative_to(Path.cwd())
    return shlex.join(["python", script.as_posix(), *(a for a in sys.argv[1:] if a not in drop)])


def commands_lines(commands: list[str], what: str) -> list[str]:
    """Markdown for the commands that filled a table in pieces: one line when there is one, a
    folded list otherwise (a run resumed option by option records many)."""
    if len(commands) == 1:
        return [f"{what}: `{commands[0]}`"]
    items = [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]
    return ["<details>", f"<summary>{what}: {len(commands)} commands, in order</summary>", "", *items, "", "</details>"]


def invocations(json_path: Path, command: str) -> list[str]:
    """The recorded commands, then ``command`` if it is new: what to save with the next rows."""
    saved = recorded_commands(json_path)
    return saved + ([command] if command not in saved else [])


def write_markdown(out: Path, lines: list[str], command: str | list[str]) -> None:
    """``out/results.md``: ``lines`` then the command, or every command, that produced them."""
    footer = commands_lines([command] if isinstance(command, str) else command, "Filled by")
    (out / "results.md").write_text("\n".join(lines + ["", *footer, ""]))


def ratio_bars(path: Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    """A bar chart of ratios around 1 (one group per label, one bar per series), saved to ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + width * i for j in range(len(labels))], [v - 1 for v in values], width, bottom=1, label=name)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
