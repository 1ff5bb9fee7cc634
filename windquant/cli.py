"""windquant: compress a causal LLM to ~2 bits per weight under one global bit budget (quantize, sweep, eval, inspect, generate, gguf, export-gguf)."""

from __future__ import annotations

import argparse
import os
import sys

from windquant.errors import WindquantError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_fit_flags(p) -> dict[str, str]:
    """Flags shared by quantize and sweep: the model, what is fitted and calibrated, the accounting."""
    from windquant.cliflags import add_config_flags
    from windquant.config import FitConfig, PlanConfig

    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), gemma3-270m, a .gguf file, an HF folder or a Hub id")
    flags = add_config_flags(p, FitConfig, "fit.")
    flags |= add_config_flags(p, PlanConfig, "plan.", exclude=("target_bits", "allocator"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return flags


def _add_quantize(sub) -> dict[str, str]:
    from windquant.alloc import ALLOCATORS
    from windquant.cliflags import add_allocator_flags, add_config_flags
    from windquant.config import PlanConfig

    p = sub.add_parser("quantize", help="quantize a model to a mixed-precision packed checkpoint")
    flags = _add_fit_flags(p)
    flags |= add_config_flags(p, PlanConfig, "plan.", exclude=("accounting", "seed"))
    p.epilog = "allocators: " + "; ".join(f"{s.name}: {s.help}" for s in ALLOCATORS.values())
    flags |= add_allocator_flags(p)
    p.add_argument("--out", help="checkpoint folder to write")
    p.add_argument(
        "--embedding-bits",
        type=int,
        choices=(16, 8, 4),
        default=8,
        help="the token embedding (and an untied head) stored per row: 16 fp16, 8 INT8 with a scale per row, "
        "4 INT4 with a scale per 32 columns (default %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dry-run", action="store_true", help="print units and sizes, then stop")
    return flags


def _add_sweep(sub) -> dict[str, str]:
    from windquant.cliflags import add_allocator_flags

    p = sub.add_parser("sweep", help="fit once, then plan and score every budget x allocator (Pareto table + PNG)")
    flags = _add_fit_flags(p)
    flags |= add_allocator_flags(p)
    p.add_argument("--budgets", default="1.8,2.0,2.25,2.5,3,4", help="comma-separated targets (default %(default)s)")
    p.add_argument("--allocators", default="uniform,heuristic,ilp", help="comma-separated (default %(default)s)")
    p.add_argument("--corpus", default="builtin", help="evaluation corpus: builtin | mix | wikitext2 | PATH (default %(default)s)")
    p.add_argument("--ctx", type=int, default=2048, help="evaluation context (default %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    p.add_argument("--out", required=True, help="folder for plans, results.json, results.md, pareto.png")
    return flags


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity and/or zero-shot accuracy of a checkpoint or model spec",
        description="Perplexity on --corpus (default). With --tasks: zero-shot accuracy through lm-eval "
        "instead; give --corpus too to get both. A checkpoint is evaluated on its dequantized weights "
        "(each layer unpacked once, fp32): faster than the int4 runtime on long windows and exactly the "
        "model quantize scored; the runtime (windquant generate, windquant.load) agrees within 0.5%% perplexity.",
    )
    p.add_argument("model", help="checkpoint folder or model spec")
    p.add_argument(
        "--corpus",
        default=None,
        help="builtin | mix | wikitext2 | PATH (default wikitext2; with --tasks, perplexity runs only if --corpus is given)",
    )
    p.add_argument("--ctx", type=int, default=None, help="context length (default 2048; llamacpp protocol 512)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows (llamacpp protocol: 100)")
    p.add_argument(
        "--protocol",
        choices=("windows", "llamacpp"),
        default="windows",
        help="windows: every prediction of non-overlapping windows (GPTQ/AWQ); llamacpp: llama-perplexity's "
        "(ctx 512, first 100 chunks of the raw file, second half of each chunk scored) (default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="perplexity windows per forward (default %(default)s)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding wikitext-2-raw/ and, for --tasks, piqa/, arc_easy/, ... (directly or under zeroshot/); "
        "without it zero-shot data comes from the Hugging Face Hub",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="zero-shot tasks through lm-eval, comma-separated: arc_easy,arc_challenge,boolq,piqa,hellaswag,winogrande",
    )
    p.add_argument("--limit", type=int, default=None, help="zero-shot: score only the first N examples of each task")
    p.add_argument("--zs-batch-size", type=int, default=8, help="zero-shot: lm-eval batch size (default %(default)s)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the result to this JSON file")
    p.add_argument(
        "--reference",
        default=None,
        metavar="SPEC",
        help="also evaluate this model (e.g. the unquantized one) on the same span and end with a side-by-side summary",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking a checkpoint's tensors against their digests (trusted folders only)",
    )


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="accounting, action distribution and per-layer bit map of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--png", default=None, help="bit-map image path (default CHECKPOINT/bitmap.png)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a checkpoint or model spec")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument(
        "--no-runtime",
        action="store_true",
        help="run a checkpoint's dequantize-per-forward modules instead of the int4/int8 runtime (the default, "
        "weights packed, bf16 activations)",
    )
    p.add_argument(
        "--dense-cache",
        action="store_true",
        help="without the runtime, keep each layer's dense weights after its first use (the memory of a dense model)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking a checkpoint's tensors against their digests (trusted folders only)",
    )


def _add_gguf_writer_flags(p, types_help: str, embedding_help: str, work_help: str) -> None:
    """Flags shared by gguf and export-gguf: which types, the embedding's, the writer, the work folder."""
    p.add_argument("--types", default=None, help=f"{types_help}, comma-separated")
    p.add_argument("--embedding-type", default="Q8_0", help=f"{embedding_help} (default %(default)s)")
    p.add_argument("--no-llamacpp", action="store_true", help="write with gguf-py even when llama.cpp is built")
    p.add_argument("--work-dir", default=None, help=f"{work_help} (default ~/.cache/windquant/gguf, or $WINDQUANT_CACHE/gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_gguf(sub) -> None:
    p = sub.add_parser(
        "gguf",
        help="re-quantize a GGUF model for llama.cpp: one type per block linear, chosen for a bits-per-weight target",
        description="Chooses one llama.cpp tensor type per block linear by the exact knapsack on windquant's "
        "sensitivity costs (each type's real round trip, weighted by calibration statistics) under --target-bpw "
        "on the block linears (scales included), and writes the GGUF with llama-quantize (built by `make llamacpp`) "
        "or, without it, with gguf-py (types Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 only).",
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), gemma3-270m or a .gguf file")
    p.add_argument("--target-bpw", type=float, required=True, help="bits per weight of the block linears, scales included")
    p.add_argument("--out", help="GGUF file to write (a report goes beside it as OUT.json)")
    _add_gguf_writer_flags(
        p,
        "candidate types (default: every type the writer makes)",
        "type of token_embd.weight",
        "reference, imatrix and candidate costs",
    )
    p.add_argument("--output-type", default=None, help="type of output.weight when untied (default: the embedding's)")
    p.add_argument("--calib", default="mix", help="calibration corpus: builtin | mix | self | wikitext2 | PATH, or parts joined by + (mix+self) (default %(default)s)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default %(default)s)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window (default %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder holding WikiText-2 (else $WINDQUANT_DATA)")
    p.add_argument("--dry-run", action="store_true", help="print the recipe and its sizes, write no GGUF")


def _add_export_gguf(sub) -> None:
    p = sub.add_parser(
        "export-gguf",
        help="a windquant checkpoint as a GGUF for llama.cpp (its plan projected to one type per tensor)",
        description="Each block linear takes the GGUF type nearest its true bits in the checkpoint (jointly, within the "
        "checkpoint's bytes when the types allow); the checkpoint's dequantized weights are requantized to it. Lost: "
        "per-chunk mixing, the salient INT8 weights' exact values, the codes themselves (a second quantization).",
    )
    p.add_argument("checkpoint", help="checkpoint folder written by windquant quantize")
    p.add_argument("--out", required=True, help="GGUF file to write (a report goes beside it as OUT.json)")
    p.add_argument("--model", default=None, help="the checkpoint's source model (default: from its run_report.json); must be a GGUF")
    _add_gguf_writer_flags(
        p,
        "allowed types (default: every type the writer makes, and F16)",
        "type of token_embd.weight and output.weight",
        "the source's F16 reference",
    )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser and, for error messages, the flag that sets each library setting."""
    parser = argparse.ArgumentParser(prog="windquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    flags = _add_quantize(sub)
    flags |= _add_sweep(sub)
    _add_eval(sub)
    _add_inspect(sub)
    _add_generate(sub)
    _add_gguf(sub)
    _add_export_gguf(sub)
    return parser, flags


def main(argv: list[str] | None = None) -> int:
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is first imported: silences the GGUF conversion bar too
    try:
        from windquant import commands
        from windquant.runinfo import set_threads

        set_threads()
        return getattr(commands, f"cmd_{args.command.replace('-', '_')}")(args)
    except WindquantError as exc:
        hint = f" (set with {flags[exc.setting]})" if exc.setting in flags else ""
        print(f"windquant: error: {exc}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("windquant: interrupted; no partial output was written (a sweep keeps its finished rows: run it again to go on)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
