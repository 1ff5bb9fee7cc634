"""windquant: compress a causal LLM to ~2 bits per weight under one global bit budget (quantize, sweep, eval, inspect, generate)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from windquant.errors import WindquantError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _threads() -> None:
    # Never oversubscribe: OpenMP spin on busy cores slows small ops by >10x.
    import torch

    torch.set_num_threads(int(os.environ.get("WINDQUANT_THREADS", os.cpu_count() or 1)))


def _add_fit_flags(p, d) -> None:
    """Flags shared by quantize and sweep: what is fitted and calibrated."""
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a .gguf file, an HF folder or a Hub id")
    p.add_argument("--accounting", choices=["true", "paper"], default=d.accounting, help="which bits the budget counts")
    p.add_argument("--chunk", type=int, default=d.chunk, help="columns per unit (default %(default)s)")
    p.add_argument("--salient", type=float, default=d.salient, help="INT8-protected fraction per unit (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps per operator fit (default %(default)s)")
    p.add_argument(
        "--fallback-threshold",
        type=float,
        default=d.fallback_threshold,
        help="relative error above which a unit moves to the next precision (default %(default)s)",
    )
    p.add_argument("--calib", default=d.calib, help="builtin | wikitext2 | PATH to .txt/.jsonl (default %(default)s)")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples, help="calibration windows (default %(default)s)")
    p.add_argument("--calib-len", type=int, default=d.calib_len, help="tokens per window (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-dir", default=None, help="folder holding WikiText-2 (else $WINDQUANT_DATA)")
    p.add_argument("--cache-dir", default=None, help="candidate cache root (default ~/.cache/windquant)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_ppo_flags(p, d) -> None:
    """Flags of the PPO allocator (paper defaults, smaller CPU proxy)."""
    g = p.add_argument_group("ppo allocator (--allocator ppo)")
    g.add_argument("--episodes", type=int, default=d.episodes, help="training episodes (default %(default)s, as the paper)")
    g.add_argument(
        "--proxy-samples",
        type=int,
        default=d.proxy_samples,
        help="calibration windows scored per episode (default %(default)s; paper 64)",
    )
    g.add_argument("--proxy-len", type=int, default=d.proxy_len, help="tokens per proxy window (default %(default)s)")
    g.add_argument("--ppo-dir", default=None, help="checkpoints + episode log (default: under the candidate cache)")
    g.add_argument("--resume", action="store_true", help="continue a killed PPO run from its last checkpoint")
    g.add_argument("--policy", default=None, help="reuse a trained policy.safetensors zero-shot (no training)")
    g.add_argument(
        "--ppo-set",
        default=None,
        metavar="K=V,...",
        help="override PPOConfig fields, e.g. gamma=1.0,entropy_coef=0.01 (defaults: the paper's values)",
    )


def _add_quantize(sub) -> None:
    from windquant.alloc import ALLOCATORS
    from windquant.config import QuantConfig

    d = QuantConfig()
    p = sub.add_parser("quantize", help="quantize a model to a mixed-precision packed checkpoint")
    _add_fit_flags(p, d)
    p.add_argument(
        "--target-bits",
        type=float,
        default=None,
        help=f"average bits per weight on --accounting (default {d.target_bits}; none with --uniform-action)",
    )
    p.add_argument("--allocator", default=d.allocator, help=f"one of {', '.join(ALLOCATORS)} (default %(default)s)")
    p.add_argument("--uniform-action", type=float, default=None, help="with --allocator uniform: this action everywhere")
    _add_ppo_flags(p, d)
    p.add_argument("--out", help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dry-run", action="store_true", help="print units and sizes, then stop")


def _add_sweep(sub) -> None:
    from windquant.config import QuantConfig

    p = sub.add_parser("sweep", help="fit once, then plan and score every budget x allocator (Pareto table + PNG)")
    _add_fit_flags(p, QuantConfig())
    _add_ppo_flags(p, QuantConfig())
    p.add_argument("--budgets", default="1.8,2.0,2.25,2.5,3,4", help="comma-separated targets (default %(default)s)")
    p.add_argument("--allocators", default="uniform,heuristic,ilp", help="comma-separated (default %(default)s)")
    p.add_argument("--corpus", default="builtin", help="evaluation corpus: builtin | wikitext2 | PATH (default %(default)s)")
    p.add_argument("--ctx", type=int, default=2048, help="evaluation context (default %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    p.add_argument("--out", required=True, help="folder for plans, results.json, results.md, pareto.png")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity and/or zero-shot accuracy of a checkpoint or model spec",
        description="Perplexity on --corpus (default). With --tasks: zero-shot accuracy through lm-eval "
        "instead; give --corpus too to get both.",
    )
    p.add_argument("model", help="checkpoint folder or model spec")
    p.add_argument(
        "--corpus",
        default=None,
        help="builtin | wikitext2 | PATH (default wikitext2; with --tasks, perplexity runs only if --corpus is given)",
    )
    p.add_argument("--ctx", type=int, default=2048, help="context length (default %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
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
    p.add_argument("--quiet", action="store_true")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="windquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_sweep(sub)
    _add_eval(sub)
    _add_inspect(sub)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _threads()
        if getattr(args, "quiet", False):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        from windquant import commands

        return getattr(commands, f"cmd_{args.command}")(args)
    except WindquantError as exc:
        print(f"windquant: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("windquant: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
