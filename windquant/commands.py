"""What each CLI sub-command does (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from windquant.errors import WindquantError


def _config_from_args(args: argparse.Namespace):
    from windquant.config import QuantConfig

    allocator = getattr(args, "allocator", QuantConfig.allocator)
    uniform_action = getattr(args, "uniform_action", None)
    if uniform_action is not None and allocator != "uniform":
        raise WindquantError("--uniform-action only applies to --allocator uniform")
    target = getattr(args, "target_bits", None)
    if target is None and uniform_action is None:
        target = QuantConfig.target_bits
    return QuantConfig(
        target_bits=target,
        accounting=args.accounting,
        allocator=allocator,
        uniform_action=uniform_action,
        chunk=args.chunk,
        salient=args.salient,
        steps=args.steps,
        fallback_threshold=args.fallback_threshold,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
        seed=args.seed,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        episodes=args.episodes,
        proxy_samples=args.proxy_samples,
        proxy_len=args.proxy_len,
        ppo_dir=args.ppo_dir,
        resume=args.resume,
        policy=args.policy,
        ppo=parse_overrides(getattr(args, "ppo_set", None)),
    ).validate()


def parse_overrides(text: str | None) -> dict | None:
    """``"gamma=1.0,episodes=5"`` -> {"gamma": 1.0, ...}, checked against PPOConfig's fields."""
    if not text:
        return None
    from dataclasses import fields

    from windquant.alloc.ppo import PPOConfig

    known = [f.name for f in fields(PPOConfig)]
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in known or key in ("reward", "curriculum") or not value:
            names = ", ".join(k for k in known if k not in ("reward", "curriculum"))
            raise WindquantError(f"--ppo-set: {item!r} is not KEY=VALUE with KEY one of {names}")
        try:
            out[key] = int(value) if isinstance(getattr(PPOConfig(), key), int) else float(value)
        except ValueError:
            raise WindquantError(f"--ppo-set: {key} needs a number, got {value!r}") from None
    return out


def _dry_run(model, config) -> int:
    from windquant.inspect import untouched_bytes
    from windquant.model.units import enumerate_units
    from windquant.quant.accounting import ACTIONS, fmt_action, summarize

    units = enumerate_units(model, config.chunk)
    n = sum(u.n_weights for u in units)
    print(f"units: {len(units)} column chunks of <= {config.chunk} columns over {len({u.module for u in units})} linears")
    print(f"quantized weights: {n:,}   untouched tensors: {untouched_bytes(model) / 2**20:.1f} MiB in fp16")
    print(f"candidate cache in RAM: ~{n * (12 + 20 / 8) / 2**30:.2f} GiB (dense fp16 + packed, 6 low-bit actions)")
    print("uniform plans (before operator fallback):")
    for a in ACTIONS:
        s = summarize([u.shape for u in units], [a] * len(units), config.salient)
        print(f"  {fmt_action(a):>5} bit: true {s.true_bits:6.3f}  paper {s.paper_bits:6.3f}  {s.true_bytes / 2**20:8.1f} MiB")
    return 0


def _allocator_files(plan) -> list[Path]:
    """Files an allocator left that belong in the checkpoint (PPO: episode log, curve, policy)."""
    from windquant.alloc.ppo.train import CURVE, EPISODES, POLICY

    ppo = plan.info.get("ppo")
    if not ppo:
        return []
    return [p for name in (EPISODES, CURVE, POLICY) if (p := Path(ppo["work_dir"]) / name).is_file()]


def cmd_quantize(args: argparse.Namespace) -> int:
    from windquant.alloc import get_allocator
    from windquant.inspect import plan_report
    from windquant.model.loading import load_model
    from windquant.pack.checkpoint import prepare_out_dir, save
    from windquant.pipeline import apply, make_plan, prepare
    from windquant.runinfo import Timings

    config = _config_from_args(args)
    get_allocator(config.allocator)
    if not args.dry_run:
        if not args.out:
            raise WindquantError("give --out DIR for the checkpoint (or --dry-run)")
        prepare_out_dir(args.out, args.overwrite)
    progress = not args.quiet
    timings = Timings()
    with timings.stage("load"):
        model, tokenizer = load_model(args.model)
    if args.dry_run:
        return _dry_run(model, config)
    prepared = prepare(model, tokenizer, config, timings, progress)
    plan = make_plan(prepared, config, timings, progress)
    apply(model, prepared, plan, timings)
    with timings.stage("pack"):
        report = plan_report(plan, model)
        out = save(model, tokenizer, plan, args.out, overwrite=args.overwrite, copy_files=_allocator_files(plan))
    report = {"model": args.model, **report, "timings": timings.report()}
    from windquant.cli import write_json

    write_json(out / "run_report.json", report)
    acc = report["accounting"]
    print(f"wrote {out}")
    print(
        f"true_bits={acc['true_bits']:.4f} paper_bits={acc['paper_bits']:.4f} "
        f"quantized_bytes={acc['quantized_bytes']:,} untouched_bytes={acc['untouched_bytes']:,}"
    )
    print("actions: " + "  ".join(f"{k}:{v:.1%}" for k, v in plan.action_distribution().items()))
    t = report["timings"]
    print(
        f"time={t['total_seconds']:.1f}s ({', '.join(f'{k} {v:.1f}s' for k, v in t['seconds'].items())}) peak_rss={t['peak_rss_mib']:.0f}MiB"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity on --corpus (default wikitext2); with --tasks zero-shot accuracy, plus perplexity if --corpus is given."""
    from windquant.eval.perplexity import model_max_context, perplexity
    from windquant.model.loading import load_model

    tasks = None
    if args.tasks is not None:
        from windquant.eval.zeroshot import parse_tasks, resolve_data_dir

        tasks = parse_tasks(args.tasks)
        if args.data_dir is not None:
            resolve_data_dir(args.data_dir, tasks)  # a missing file fails now, not after loading the model
    corpus = args.corpus if args.corpus is not None or tasks is not None else "wikitext2"
    model, tokenizer = load_model(args.model)
    payload: dict = {"model": args.model}
    if corpus is not None:
        from windquant.calib.corpus import corpus_tokens

        ctx = args.ctx
        limit = model_max_context(model)
        if limit is not None and ctx > limit:
            print(f"note: --ctx {ctx} is above the model's maximum; using {limit}")
            ctx = limit
        tokens = corpus_tokens(tokenizer, corpus, "eval", args.data_dir)
        res = perplexity(
            model, tokens, ctx=ctx, max_windows=args.max_windows, batch_size=args.batch_size, progress=not args.quiet
        )
        print(f"{res.line()} corpus={corpus}")
        payload.update({"corpus": corpus, **res.__dict__})
    if tasks is not None:
        from windquant.eval.zeroshot import evaluate_zeroshot, macro_average, result_line

        zs = evaluate_zeroshot(
            model, tokenizer, tasks, args.data_dir, limit=args.limit, batch_size=args.zs_batch_size, progress=not args.quiet
        )
        for task, r in zs.items():
            print(result_line(task, r))
        avg = macro_average(zs)
        print(f"avg: acc={avg:.4f} tasks={len(zs)}")
        payload.update({"zeroshot": zs, "zeroshot_avg_acc": avg, "zeroshot_limit": args.limit})
    if args.json_out:
        from windquant.cli import write_json

        write_json(args.json_out, payload)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from windquant.inspect import inspect_checkpoint

    print(inspect_checkpoint(Path(args.checkpoint), args.png))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from windquant.model.loading import load_model

    model, tokenizer = load_model(args.model)
    text = args.prompt
    if args.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from windquant.alloc import get_allocator
    from windquant.model.loading import load_model
    from windquant.runinfo import Timings
    from windquant.sweep import prepare_sweep, run_sweep

    config = _config_from_args(args)
    allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
    for name in allocators:
        get_allocator(name)
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise WindquantError(f"--budgets must be comma-separated numbers, got {args.budgets!r}") from None
    model, tokenizer = load_model(args.model)
    timings = Timings()
    prepared = prepare_sweep(model, tokenizer, config, allocators, timings, progress=not args.quiet)
    run_sweep(
        model,
        tokenizer,
        prepared,
        budgets,
        allocators,
        args.corpus,
        args.ctx,
        args.max_windows,
        Path(args.out),
        timings,
        progress=not args.quiet,
    )
    print((Path(args.out) / "results.md").read_text())
    return 0
