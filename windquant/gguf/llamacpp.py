"""llama.cpp's command-line tools, built by ``make llamacpp`` (optional: without them ``windquant
gguf`` uses the types gguf-py quantizes). Looked up in ``$WINDQUANT_LLAMACPP`` when set, else in
the ``.llamacpp/bin`` folder of the source tree windquant runs from, then on ``PATH``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from windquant.errors import WindquantError
from windquant.files import atomic_write_text

BUILD_HINT = "build them with `make llamacpp` (or point $WINDQUANT_LLAMACPP at a folder holding them)"
_TREE_BIN = Path(__file__).resolve().parents[2] / ".llamacpp" / "bin"


def find_tool(name: str) -> Path | None:
    """Path of llama.cpp's tool ``name`` (e.g. ``llama-quantize``), or None when absent; when
    ``$WINDQUANT_LLAMACPP`` is set, only that folder is looked in."""
    folder = os.environ.get("WINDQUANT_LLAMACPP")
    if folder is not None:
        return Path(folder) / name if (Path(folder) / name).is_file() else None
    if (_TREE_BIN / name).is_file():
        return _TREE_BIN / name
    found = shutil.which(name)
    return Path(found) if found else None


def require_tool(name: str) -> Path:
    tool = find_tool(name)
    if tool is None:
        raise WindquantError(f"llama.cpp's {name} was not found; {BUILD_HINT}")
    return tool


def _threads() -> str:
    """One thread per core, the count every llama.cpp tool here is given."""
    return str(max(1, os.cpu_count() or 1))


def run_tool(name: str, args: list[str | Path]) -> str:
    """Run llama.cpp's ``name`` with ``args``; its output, or a one-line error with its last line."""
    cmd = [str(require_tool(name)), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise WindquantError(f"{name} failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")
    return done.stdout + done.stderr


def quantize(
    source: Path,
    out: Path,
    ftype: str,
    imatrix: Path | None = None,
    pure: bool = False,
    tensor_types: Path | None = None,
    token_embedding_type: str | None = None,
    output_tensor_type: str | None = None,
) -> None:
    """``llama-quantize`` of ``source`` into ``out`` as file type ``ftype``."""
    args: list[str | Path] = []
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    if pure:
        args.append("--pure")
    if tensor_types is not None:
        args += ["--tensor-type-file", tensor_types]
    if token_embedding_type is not None:
        args += ["--token-embedding-type", token_embedding_type]
    if output_tensor_type is not None:
        args += ["--output-tensor-type", output_tensor_type]
    run_tool("llama-quantize", [*args, source, out, ftype, _threads()])


def importance_matrix(model: Path, tokenizer, windows, out: Path) -> None:
    """``llama-imatrix``'s importance matrix of ``model`` on calibration ``windows`` ([n, ctx] token
    ids), written to ``out``. The tool reads text: the windows are decoded into ``out`` with a
    ``.txt`` suffix (kept, so the matrix can be remade by hand) and it re-tokenizes them in
    windows of the same length."""
    text = out.with_suffix(".txt")
    atomic_write_text(text, "".join(tokenizer.decode(w) for w in windows))
    args = ["-m", model, "-f", text, "-o", out, "-c", windows.shape[1], "--chunks", len(windows), "-t", _threads()]
    run_tool("llama-imatrix", args)


_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_RUNNING = re.compile(r"\[\d+\]([0-9.]+),")


def perplexity(model: Path, text_file: Path, ctx: int = 512, chunks: int = 100) -> tuple[float, float]:
    """``llama-perplexity`` of a GGUF on a raw text file: (PPL, its standard error), scored as
    llama.cpp scores it (the second half of each ``ctx`` window, the first ``chunks`` windows)."""
    out = run_tool("llama-perplexity", ["-m", model, "-f", text_file, "-c", ctx, "--chunks", chunks, "-b", ctx])
    m = _FINAL.search(out)
    if m is not None:
        return float(m.group(1)), float(m.group(2))
    # Its log thread can lose the last line at exit; the running estimate after the last chunk is
    # the same number (without the error bar).
    running = _RUNNING.findall(out)
    if not running:
        raise WindquantError(f"llama-perplexity printed no estimate for {model}")
    return float(running[-1]), float("nan")


_KLD = re.compile(r"Mean\s+KLD:\s+([0-9.]+) ± +([0-9.]+)")


def kl_divergence_base(model: Path, text_file: Path, base: Path, ctx: int = 512, chunks: int = 100) -> None:
    """Save ``model``'s logits on the first ``chunks`` windows of ``text_file`` to ``base`` (the
    reference of :func:`kl_divergence`)."""
    run_tool(
        "llama-perplexity", ["-m", model, "-f", text_file, "-c", ctx, "--chunks", chunks, "-b", ctx, "--kl-divergence-base", base]
    )


def kl_divergence(model: Path, base: Path, ctx: int = 512) -> tuple[float, float]:
    """Mean KL divergence of ``model``'s next-token distributions from the saved reference logits
    (same tokens, same scored positions), and its standard error: a quality measure that stays
    meaningful where perplexity does not (a random model's PPL is noise)."""
    out = run_tool("llama-perplexity", ["-m", model, "-c", ctx, "-b", ctx, "--kl-divergence-base", base, "--kl-divergence"])
    m = _KLD.search(out)
    if m is None:
        raise WindquantError(f"llama-perplexity printed no mean KL divergence for {model}")
    return float(m.group(1)), float(m.group(2))
