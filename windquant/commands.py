"""What each CLI sub-command does (argument parsing lives in cli.py and cliflags.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from windquant.errors import WindquantError, non_finite_logits

DEFAULT_EVAL_CORPUS = "wikitext2"  # eval's and sweep's --corpus: WikiText-2 test, from --data-dir or $WINDQUANT_DATA


def fit_config_from_args(args: argparse.Namespace):
    from windquant.cliflags import config_from_args
    from windquant.config import FitConfig

    return config_from_args(args, FitConfig, "fit.").validate()


def plan_config_from_args(args: argparse.Namespace):
    """The plan config of ``quantize``: target, accounting, allocator and its flags."""
    from windquant.alloc import get_allocator
    from windquant.cliflags import allocator_configs, given
    from windquant.config import PlanConfig

    values = given(args, PlanConfig, "plan.")
    name = get_allocator(values.get("allocator", PlanConfig.allocator)).name
    allocator_config = allocator_configs(args, [name])[name]
    if "target_bits" not in values and getattr(allocator_config, "fixes_plan", False):
        values["target_bits"] = None  # a fixed plan (e.g. uniform --uniform-action 4) needs no budget
    return PlanConfig(**values, allocator_config=allocator_config).validate()


def _dry_run(model, fit) -> int:
    from windquant.actions import ACTIONS, fmt_action
    from windquant.model.units import enumerate_units
    from windquant.quant.accounting import summarize
    from windquant.reports import untouched_bytes

    units = enumerate_units(model, fit.chunk)
    n = sum(u.n_weights for u in units)
    print(f"units: {len(units)} column chunks of <= {fit.chunk} columns over {len({u.module for u in units})} linears")
    print(f"quantized weights: {n:,}   untouched tensors: {untouched_bytes(model) / 2**20:.1f} MiB in fp16")
    print(
        f"candidate cache on disk: ~{n * 20 / 8 / 2**30:.2f} GiB packed (6 low-bit actions) + input moments; "
        f"in RAM only its tables, +{n * 12 / 2**30:.2f} GiB dense for RL allocators"
    )
    print("uniform plans (before operator fallback):")
    for a in ACTIONS:
        s = summarize([u.shape for u in units], [a] * len(units), fit.salient, fit.rotate)
        print(f"  {fmt_action(a):>5} bit: true {s.true_bits:6.3f}  paper {s.paper_bits:6.3f}  {s.true_bytes / 2**20:8.1f} MiB")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from windquant.alloc import get_allocator
    from windquant.pack.checkpoint import expected_bytes, prepare_out_dir
    from windquant.pack.integrity import check_free_space
    from windquant.pipeline import make_plan, prepare, write_checkpoint
    from windquant.quant.row_formats import resolve_row_format
    from windquant.quant.streamed import process_group
    from windquant.reports import quantize_summary
    from windquant.runinfo import Timings
    from windquant.runtime.loading import load_model

    fit, plan_config = fit_config_from_args(args), plan_config_from_args(args)
    # Under torchrun (several processes share the candidate fit) the first one writes the checkpoint.
    first = args.dry_run or process_group()[0] == 0
    if not args.dry_run:
        if not args.out:
            raise WindquantError("give --out DIR for the checkpoint (or --dry-run)")
        if first:
            prepare_out_dir(args.out, args.overwrite)
    progress = not args.quiet and first
    timings = Timings()
    with timings.stage("load"):
        # Held as stored (blocks compute in float32), unless the whole model is run on plans
        # (scale tuning, an allocator scoring plans on the real model).
        whole = fit.tune_steps > 0 or "proxy" in get_allocator(plan_config.allocator).needs
        model, tokenizer = load_model(args.model, dtype=torch.float32 if whole else "auto")
    if args.dry_run:
        return _dry_run(model, fit)
    rows = resolve_row_format(args.embedding_bits, plan_config.target_bits)
    if first:  # fail now, not after the long fit, when --out cannot hold the checkpoint
        out = Path(args.out).expanduser()
        # The budget bounds the true bits; paper accounting does not count scales and indices:
        # allow one more bit per weight (no target: an all-fp16 plan).
        bits = min(16.0, plan_config.budget_bits + (1 if plan_config.accounting == "paper" else 0))
        check_free_space(out.parent, expected_bytes(model, bits, rows), "the checkpoint")
    prepared = prepare(model, tokenizer, fit, get_allocator(plan_config.allocator).needs, timings, progress)
    if not first:  # its share of the fit is written
        return 0
    plan = make_plan(prepared, plan_config, timings, progress)
    out, report = write_checkpoint(
        prepared,
        plan,
        args.out,
        args.overwrite,
        model_name=args.model,
        timings=timings,
        progress=not args.quiet,
        embedding_bits=rows,
    )
    print(quantize_summary(out, plan, report, args.model, fit.data_dir))
    return 0


def _evaluate(spec: str, args: argparse.Namespace, corpus: str | None, tasks: list[str] | None) -> dict:
    """Perplexity on ``corpus`` and/or zero-shot ``tasks`` of one model spec; prints each result."""
    from windquant.eval.perplexity import PROTOCOLS, model_max_context, perplexity
    from windquant.reports import file_line
    from windquant.runtime.loading import is_checkpoint, load_model, read_quant_config

    start = time.perf_counter()
    # Scoring long windows: the dequantized path, each layer unpacked once (see the eval help).
    model, tokenizer = load_model(spec, dense_cache=True, runtime=False, verify=not args.no_verify)
    payload: dict = {"model": spec}
    if is_checkpoint(Path(spec).expanduser()):
        payload["sizes"] = read_quant_config(Path(spec).expanduser()).get("sizes", {})
        print(file_line(payload["sizes"]))
    if corpus is not None:
        from windquant.calib.corpus import corpus_tokens, window_bos

        protocol = PROTOCOLS[args.protocol]
        ctx = args.ctx or protocol.ctx
        limit = model_max_context(model)
        if limit is not None and ctx > limit:
            print(f"note: --ctx {ctx} is above the model's maximum; using {limit}")
            ctx = limit
        tokens = corpus_tokens(tokenizer, corpus, "eval", args.data_dir, raw=protocol.raw_text)
        res = perplexity(
            model,
            tokens,
            ctx=ctx,
            max_windows=args.max_windows or protocol.max_windows,
            batch_size=args.batch_size,
            progress=not args.quiet,
            first=ctx // 2 if protocol.second_half else 0,
            bos_id=window_bos(tokenizer),
        )
        print(f"{res.line()} corpus={corpus} protocol={args.protocol}")
        payload.update({"corpus": corpus, "protocol": args.protocol, **res.__dict__})
    if tasks is not None:
        from windquant.eval.zeroshot import evaluate_zeroshot, macro_average, result_line

        zs = evaluate_zeroshot(
            model,
            tokenizer,
            tasks,
            args.data_dir,
            limit=args.limit,
            batch_size=args.zs_batch_size,
            progress=not args.quiet,
            per_document=bool(args.reference),  # what the side-by-side's paired difference reads
        )
        for task, r in zs.items():
            print(result_line(task, r))
        avg = macro_average(zs)
        print(f"avg: acc={avg:.4f} tasks={len(zs)}")
        payload.update({"zeroshot": zs, "zeroshot_avg_acc": avg, "zeroshot_limit": args.limit})
    payload["eval_seconds"] = round(time.perf_counter() - start, 1)
    return payload


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity on --corpus (default wikitext2, as sweep); with --tasks zero-shot accuracy, plus perplexity if --corpus is given;
    with --reference the same for a second model and a side-by-side summary."""
    tasks = None
    if args.tasks is not None:
        from windquant.eval.zeroshot import parse_tasks, resolve_data_dir

        tasks = parse_tasks(args.tasks)
        if args.data_dir is not None:
            resolve_data_dir(args.data_dir, tasks)  # a missing file fails now, not after loading the model
    corpus = args.corpus if args.corpus is not None or tasks is not None else DEFAULT_EVAL_CORPUS
    if corpus is not None:
        from windquant.calib.corpus import check_eval_corpus

        check_eval_corpus(corpus, args.data_dir)  # a missing corpus fails now, not after loading the model
    payload = _evaluate(args.model, args, corpus, tasks)
    if args.reference:
        from windquant.reports import side_by_side
        from windquant.runinfo import peak_rss_mib

        print(f"reference: {args.reference}")
        payload["reference"] = _evaluate(args.reference, args, corpus, tasks)
        payload["peak_rss_mib"] = round(peak_rss_mib(), 1)
        print(side_by_side(payload["reference"], payload))
    if args.json_out:
        from windquant.files import atomic_write_json

        atomic_write_json(args.json_out, payload)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from windquant.reports import inspect_checkpoint

    print(inspect_checkpoint(Path(args.checkpoint), args.png))
    return 0


def _require_finite_logits(_input_ids, scores):
    """generate() logits processor: nan/+inf scores are an error, not garbage tokens (-inf is a
    legitimate mask from other processors)."""
    if scores.isnan().any() or scores.isposinf().any():
        raise non_finite_logits("generate")
    return scores


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from windquant.runinfo import return_large_frees_to_os
    from windquant.runtime.loading import load_model

    # generate()'s KV cache and prefill activations leave the RSS once freed. Process-wide, so
    # only this command sets it: load() in a user's process leaves their allocator alone.
    return_large_frees_to_os()
    runtime = not (args.no_runtime or args.dense_cache)
    model, tokenizer = load_model(args.model, dense_cache=args.dense_cache, runtime=runtime, verify=not args.no_verify)
    text = args.prompt
    if args.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    elif args.chat:  # e.g. Gemma-3-270M's GGUF ships none
        print("note: this model's tokenizer has no chat template; --chat sends the prompt as plain text", file=sys.stderr)
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=args.max_new_tokens, do_sample=False, logits_processor=[_require_finite_logits]
        )
    print(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from windquant.alloc import get_allocator
    from windquant.calib.corpus import check_eval_corpus
    from windquant.cliflags import allocator_configs, config_from_args
    from windquant.config import PlanConfig
    from windquant.pipeline import needs_of, prepare
    from windquant.runinfo import Timings
    from windquant.runtime.loading import load_model
    from windquant.sweep import run_sweep

    fit = fit_config_from_args(args)
    base = config_from_args(args, PlanConfig, "plan.")  # accounting and allocator seed of every row
    names = [get_allocator(a.strip()).name for a in args.allocators.split(",") if a.strip()]
    configs = allocator_configs(args, names)
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise WindquantError(f"--target-bits must be comma-separated numbers, got {args.budgets!r}") from None
    corpus = args.corpus or DEFAULT_EVAL_CORPUS
    check_eval_corpus(corpus, fit.data_dir)  # a missing corpus fails now, not after the fit
    model, tokenizer = load_model(args.model)
    timings = Timings()
    progress = not args.quiet
    prepared = prepare(model, tokenizer, fit, needs_of(names), timings, progress)
    run_sweep(prepared, budgets, configs, base, corpus, args.ctx, args.max_windows, Path(args.out), timings, progress)
    print((Path(args.out) / "results.md").read_text())
    return 0


def cmd_gguf(args: argparse.Namespace) -> int:
    """Choose one llama.cpp type per block linear for --target-bits; write the GGUF unless --dry-run."""
    from windquant.config import FitConfig
    from windquant.gguf.build import GGUFConfig, build_gguf
    from windquant.gguf.types import parse_type

    if args.out is None and not args.dry_run:
        raise WindquantError("give --out FILE.gguf (or --dry-run to print the recipe only)")
    out = None if args.dry_run else Path(args.out)
    _refuse_existing(out, args.overwrite)
    if args.target_bits <= 0:
        raise WindquantError(f"--target-bits must be positive, got {args.target_bits:g}")
    cfg = GGUFConfig(
        target_bpw=args.target_bits,
        types=tuple(parse_type(t) for t in args.types.split(",")) if args.types else None,
        embedding_type=parse_type(args.embedding_type),
        output_type=parse_type(args.output_type) if args.output_type else None,
        llamacpp=not args.no_llamacpp,
        coarse_bpw=0.0 if args.no_recipe_check else GGUFConfig.coarse_bpw,
        source_grids=not args.no_source_grids,
        importance=args.importance,
    )
    fit = FitConfig(
        calib=args.calib, calib_samples=args.calib_samples, calib_len=args.calib_len, data_dir=args.data_dir
    ).validate()
    report = build_gguf(args.model, out, cfg, fit, _gguf_work_dir(args), progress=not args.quiet)
    if args.dry_run:
        for name, qtype in report["types"].items():
            print(f"{name} {qtype}")
    if check := report["recipe_check"]:
        scored = ", ".join(f"{name} {ppl:.3f}" for name, ppl in check["heldout_ppl"].items())
        print(f"recipe check ({check['windows']}): {scored} -> kept {check['chosen']}")
    print(f"writer={report['writer']} types: " + "  ".join(f"{k}:{v}" for k, v in report["type_counts"].items()))
    line = f"block linears: {report['linear_bpw']:.4f} bpw (target {report['target_bpw']:g}), {report['linear_bytes']:,} bytes"
    if out is not None:
        line += f"; file {report['file_bytes']:,} bytes, {report['file_bpw']:.4f} bpw over all tensors -> {out}"
    print(line)
    return 0


def _refuse_existing(out: Path | None, overwrite: bool) -> None:
    if out is not None and out.exists() and not overwrite:
        raise WindquantError(f"{out} exists; pass --overwrite to replace it")


def _gguf_work_dir(args: argparse.Namespace) -> Path:
    from windquant.quant.cache import default_cache_dir

    return Path(args.work_dir) if args.work_dir else default_cache_dir() / "gguf"


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """Project a checkpoint's plan onto GGUF types and write its weights as a GGUF."""
    from windquant.gguf.export import export_gguf
    from windquant.gguf.types import parse_type

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    report = export_gguf(
        Path(args.checkpoint),
        out,
        _gguf_work_dir(args),
        spec=args.model,
        types=tuple(parse_type(t) for t in args.types.split(",")) if args.types else None,
        embedding_type=parse_type(args.embedding_type),
        use_llamacpp=not args.no_llamacpp,
        progress=not args.quiet,
    )
    print(f"writer={report['writer']} types: " + "  ".join(f"{k}:{v}" for k, v in report["type_counts"].items()))
    fit = (
        "within the checkpoint's bytes"
        if report["within_checkpoint_bytes"]
        else "above the checkpoint's bytes: no allowed type that small fits these rows"
    )
    print(f"block linears: checkpoint {report['checkpoint_linear_bpw']:.4f} bpw -> GGUF {report['linear_bpw']:.4f} bpw ({fit})")
    print(f"file {report['file_bytes']:,} bytes, {report['file_bpw']:.4f} bpw over all tensors -> {out}")
    return 0
