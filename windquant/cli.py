"""windquant: compress a causal LLM to ~2 bits per weight under one global bit budget (quantize, sweep, eval, inspect, generate, gguf, export-gguf)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from windquant.errors import WindquantError
from windquant.quant.row_formats import AUTO, AUTO_8_BIT_FROM, EMBEDDING_CHOICES, parse_row_format

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


MODEL_HELP = "smollm2-135m, gemma3-270m, a .gguf file, an HF folder or a Hub id"


def _parser(sub, name: str, **kwargs):
    from windquant.cliflags import HelpFormatter

    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def _options_last(p) -> None:
    """Print the named groups (essential first) before argparse's own "options" (just -h)."""
    p._action_groups.append(p._action_groups.pop(1))


def _add_model(group) -> None:
    group.add_argument("--model", default="smollm2-135m", help=f"the model to quantize: {MODEL_HELP} (default: %(default)s)")


def _add_fit_flags(p, plan_fields: tuple[str, ...]) -> tuple[dict[str, str], argparse._ArgumentGroup]:
    """Groups shared by quantize and sweep after their essential flags: what is calibrated and
    fitted, how the budget is counted (``plan_fields`` of PlanConfig), files and run (returned,
    for the command's own run flags)."""
    from windquant.cliflags import add_config_flags
    from windquant.config import FitConfig

    run = tuple(f.name for f in fields(FitConfig) if f.metadata.get("run"))
    fitting = p.add_argument_group("fitting (calibration and candidates; cached by these settings)")
    flags = add_config_flags(fitting, FitConfig, "fit.", exclude=("calib", *run))
    flags |= _add_plan_flags(p.add_argument_group("budget"), plan_fields)
    files = p.add_argument_group("files and run")
    flags |= add_config_flags(files, FitConfig, "fit.", only=run)
    files.add_argument("--quiet", action="store_true", help="no progress bars")
    return flags, files


def _add_plan_flags(group, only: tuple[str, ...]) -> dict[str, str]:
    from windquant.alloc import ALLOCATORS
    from windquant.cliflags import add_config_flags
    from windquant.config import PlanConfig

    return add_config_flags(group, PlanConfig, "plan.", only=only, choices={"allocator": tuple(ALLOCATORS)})


def _add_calib(group) -> dict[str, str]:
    from windquant.cliflags import add_config_flags
    from windquant.config import FitConfig

    return add_config_flags(group, FitConfig, "fit.", only=("calib",))


def _allocators_epilog() -> str:
    from windquant.alloc import ALLOCATORS

    return "allocators: " + "; ".join(f"{s.name}: {s.help}" for s in ALLOCATORS.values())


def _add_quantize(sub) -> dict[str, str]:
    from windquant.cliflags import add_allocator_flags

    p = _parser(
        sub,
        "quantize",
        help="quantize a model to a mixed-precision packed checkpoint",
        description="Calibrate, fit every candidate precision of every unit (cached), choose one per unit "
        "under --target-bits with --allocator, and write a packed checkpoint to --out.",
        epilog=_allocators_epilog(),
    )
    essential = p.add_argument_group("essential")
    _add_model(essential)
    flags = _add_plan_flags(essential, ("target_bits",))
    essential.add_argument("--out", help="checkpoint folder to write; required (except with --dry-run)")
    flags |= _add_plan_flags(essential, ("allocator",))
    flags |= _add_calib(essential)
    essential.add_argument(
        "--embedding-bits",
        type=parse_row_format,
        choices=EMBEDDING_CHOICES,
        default=AUTO,
        metavar="{16,8,4,mixed,auto}",
        help="the token embedding (and an untied head) stored per row: 16 fp16, 8 INT8 with a scale per row, "
        "4 INT4 with a scale per 32 columns, mixed: the 20%% most frequent tokens of the calibration text at 8, "
        f"the rest at 4; auto: 8 from --target-bits {AUTO_8_BIT_FROM:g} up, mixed below (default: %(default)s)",
    )
    fit_flags, run = _add_fit_flags(p, ("accounting", "seed"))
    flags |= fit_flags
    run.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    run.add_argument("--dry-run", action="store_true", help="print units and sizes, then stop (no --out needed)")
    flags |= add_allocator_flags(p)
    _options_last(p)
    return flags


def _add_sweep(sub) -> dict[str, str]:
    from windquant.alloc import ALLOCATORS
    from windquant.cliflags import add_allocator_flags, add_flag

    p = _parser(
        sub,
        "sweep",
        help="fit once, then plan and score every budget x allocator (Pareto table + PNG)",
        description="Fits the candidates once, then makes and scores one plan per --target-bits value and allocator "
        "(weights assembled from the candidate cache: no checkpoint is written).",
        epilog=_allocators_epilog(),
    )
    essential = p.add_argument_group("essential")
    _add_model(essential)
    add_flag(
        essential,
        ("--target-bits", "--budgets"),
        "comma-separated budgets, each as quantize's --target-bits (default: %(default)s)",
        dest="budgets",
        default="1.8,2.0,2.25,2.5,3,4",
        metavar="BITS,...",
    )
    essential.add_argument(
        "--allocators",
        default="uniform,heuristic,ilp",
        metavar="NAME,...",
        help=f"comma-separated, any of: {', '.join(ALLOCATORS)} (default: %(default)s)",
    )
    essential.add_argument("--out", required=True, help="folder for plans, results.json, results.md, pareto.png (required)")
    flags = _add_calib(essential)
    _add_eval_corpus(essential)
    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--ctx", type=int, default=2048, help="evaluation context (default: %(default)s)")
    evaluation.add_argument("--max-windows", type=int, default=None, help="score at most this many windows (default: all)")
    flags |= _add_fit_flags(p, ("accounting", "seed"))[0]
    flags |= add_allocator_flags(p)
    _options_last(p)
    return flags


def _add_eval_corpus(group) -> None:
    """eval's and sweep's --corpus: one default, one rule."""
    group.add_argument(
        "--corpus",
        default=None,
        help="evaluation corpus: wikitext2 (the test split, from --data-dir or $WINDQUANT_DATA, else the Hugging Face Hub) "
        "| mix | builtin | PATH (default: wikitext2; an error naming --data-dir and --corpus mix when it is not found)",
    )


def _add_eval(sub) -> None:
    p = _parser(
        sub,
        "eval",
        help="perplexity and/or zero-shot accuracy of a checkpoint or model spec",
        description="Perplexity on --corpus (default). With --tasks: zero-shot accuracy through lm-eval "
        "instead; give --corpus too to get both. A checkpoint is evaluated on its dequantized weights "
        "(each layer unpacked once, fp32): faster than the int4 runtime on long windows and exactly the "
        "model quantize scored; the runtime (windquant generate, windquant.load) agrees within 0.5% perplexity.",
    )
    p.add_argument("model", help=f"checkpoint folder (written by quantize) or model spec: {MODEL_HELP}")
    _add_eval_corpus(p)
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding wikitext-2-raw/ and, for --tasks, piqa/, arc_easy/, ... (directly or under zeroshot/) "
        "(default: $WINDQUANT_DATA; zero-shot data without it: the Hugging Face Hub)",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="SPEC",
        help="also evaluate this model (e.g. the unquantized one) on the same span "
        "and end with a side-by-side summary (default: none)",
    )
    p.add_argument("--ctx", type=int, default=None, help="context length (default: 2048; 512 with --protocol llamacpp)")
    p.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="score at most this many windows (default: all; 100 with --protocol llamacpp)",
    )
    p.add_argument(
        "--protocol",
        choices=("windows", "llamacpp"),
        default="windows",
        help="windows: every prediction of non-overlapping windows (GPTQ/AWQ); llamacpp: llama-perplexity's "
        "(ctx 512, first 100 chunks of the raw file, second half of each chunk scored) (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="perplexity windows per forward (default: %(default)s)")
    p.add_argument(
        "--tasks",
        default=None,
        metavar="TASK,...",
        help="zero-shot tasks through lm-eval, comma-separated: arc_easy,arc_challenge,boolq,piqa,hellaswag,winogrande "
        "(default: none, perplexity only)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="zero-shot: score only the first N examples of each task (default: all)"
    )
    p.add_argument("--zs-batch-size", type=int, default=8, help="zero-shot: lm-eval batch size for documents longer than the model's window; the rest are batched by tokens (default: %(default)s)")
    p.add_argument(
        "--json", dest="json_out", default=None, metavar="PATH", help="also write the result to this JSON file (default: none)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking a checkpoint's tensors against their digests (trusted folders only)",
    )


def _add_inspect(sub) -> None:
    p = _parser(sub, "inspect", help="accounting, action distribution and per-layer bit map of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder written by windquant quantize")
    p.add_argument("--png", default=None, help="bit-map image path (default: CHECKPOINT/bitmap.png)")


def _add_generate(sub) -> None:
    p = _parser(
        sub,
        "generate",
        help="generate text with a checkpoint or model spec",
        description="Greedy decoding (no sampling) of --prompt; prints the new text only. A checkpoint runs on the "
        "int4/int8 runtime (weights stay packed) unless --no-runtime.",
    )
    p.add_argument("model", help=f"checkpoint folder (written by quantize) or model spec: {MODEL_HELP}")
    p.add_argument("--prompt", required=True, help="the text to continue, or with --chat the user message (required)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (off: plain text)")
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


def _add_gguf_writer_flags(types, run, types_help: str, embedding_help: str, work_help: str) -> None:
    """Flags shared by gguf and export-gguf: which types, the embedding's (in ``types``); the
    writer, the work folder, overwrite and quiet (in ``run``)."""
    types.add_argument("--types", default=None, metavar="TYPE,...", help=types_help)
    types.add_argument("--embedding-type", default="Q8_0", metavar="TYPE", help=f"{embedding_help} (default: %(default)s)")
    run.add_argument("--no-llamacpp", action="store_true", help="write with gguf-py even when llama.cpp is built")
    run.add_argument(
        "--work-dir", default=None, help=f"{work_help} (default: $WINDQUANT_CACHE/gguf, else ~/.cache/windquant/gguf)"
    )
    run.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_gguf(sub) -> None:
    from windquant.cliflags import add_flag

    p = _parser(
        sub,
        "gguf",
        help="re-quantize a GGUF model for llama.cpp: one type per block linear, chosen for a bits-per-weight target",
        description="Chooses one llama.cpp tensor type per block linear by the exact knapsack on windquant's "
        "sensitivity costs (each type's real round trip, weighted by calibration statistics) under --target-bits "
        "on the block linears (scales included), and writes the GGUF with llama-quantize (built by `make llamacpp`) "
        "or, without it, with gguf-py (types Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 only).",
    )
    essential = p.add_argument_group("essential")
    essential.add_argument(
        "--model",
        default="smollm2-135m",
        help="the model to re-quantize: smollm2-135m, gemma3-270m or a .gguf file (default: %(default)s)",
    )
    add_flag(
        essential,
        ("--target-bits", "--target-bpw"),
        "bits per weight of the block linears, scales included (required)",
        dest="target_bits",
        type=float,
        required=True,
        metavar="BITS",
    )
    essential.add_argument("--out", help="GGUF file to write, a report beside it as OUT.json; required (except with --dry-run)")
    essential.add_argument(
        "--calib",
        default="mix",
        help="calibration corpus: builtin | mix | self | wikitext2 | PATH, or parts joined by + (mix+self) (default: %(default)s)",
    )
    essential.add_argument("--dry-run", action="store_true", help="print the recipe and its sizes, write no GGUF")
    types = p.add_argument_group("types")
    calib = p.add_argument_group("calibration")
    run = p.add_argument_group("writer, files and run")
    _add_gguf_writer_flags(
        types,
        run,
        "candidate types, comma-separated (default: every type the writer makes)",
        "type of token_embd.weight",
        "reference, imatrix and candidate costs",
    )
    types.add_argument(
        "--output-type", default=None, metavar="TYPE", help="type of output.weight when untied (default: the embedding's)"
    )
    types.add_argument(
        "--no-recipe-check",
        action="store_true",
        help="keep the knapsack's recipe as it is (default: when it uses types under 3 bits per weight, the recipe "
        "without them is written too and the one with the lower perplexity on held-out calibration text is kept)",
    )
    types.add_argument(
        "--no-source-grids",
        action="store_true",
        help="leave out, per tensor, the types that reproduce a quantized source's own grid (a Q4_1 source round-trips "
        "through Q4_1 almost exactly): the recipe a 16-bit source would get, for fair comparisons",
    )
    calib.add_argument(
        "--importance",
        choices=("gradient", "moments"),
        default="gradient",
        help="llama.cpp's importance matrix: each input column's E[x²] over calibration tokens weighted by the squared "
        "gradient norm at the linear's output (gradient), or unweighted as llama-imatrix computes it (moments) "
        "(default: %(default)s)",
    )
    calib.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default: %(default)s)")
    calib.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window (default: %(default)s)")
    calib.add_argument(
        "--data-dir", default=None, help="folder holding WikiText-2, for --calib wikitext2 (default: $WINDQUANT_DATA)"
    )
    _options_last(p)


def _add_export_gguf(sub) -> None:
    p = _parser(
        sub,
        "export-gguf",
        help="a windquant checkpoint as a GGUF for llama.cpp (its plan projected to one type per tensor)",
        description="Each block linear takes the GGUF type nearest its true bits in the checkpoint (jointly, within the "
        "checkpoint's bytes when the types allow); the checkpoint's dequantized weights are requantized to it. Lost: "
        "per-chunk mixing, the salient INT8 weights' exact values, the codes themselves (a second quantization).",
    )
    p.add_argument("checkpoint", help="checkpoint folder written by windquant quantize")
    p.add_argument("--out", required=True, help="GGUF file to write, a report beside it as OUT.json (required)")
    p.add_argument("--model", default=None, help="the checkpoint's source model, a GGUF (default: from its run_report.json)")
    _add_gguf_writer_flags(
        p,
        p,
        "allowed types, comma-separated (default: every type the writer makes, and F16)",
        "type of token_embd.weight and output.weight",
        "the source's F16 reference",
    )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser and, for error messages, the flag that sets each library setting."""
    from windquant.cliflags import HelpFormatter

    parser = argparse.ArgumentParser(prog="windquant", description=__doc__, formatter_class=HelpFormatter)
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
        # glibc's mmap threshold stays dynamic here: fixing it at 256 KiB for every command made a
        # cold quantize fault in 194 M fresh pages (fit 85 -> 212 s, scores 181 -> 255 s); the
        # runtime fixes it where a model is loaded to generate (runtime.loading).
        return getattr(commands, f"cmd_{args.command.replace('-', '_')}")(args)
    except WindquantError as exc:
        hint = f" (set with {flags[exc.setting]})" if exc.setting in flags else ""
        print(f"windquant: error: {exc}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "windquant: interrupted; no partial output was written (a sweep keeps its finished rows: run it again to go on)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
