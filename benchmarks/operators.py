"""Operator benchmark on the default model's real weights.

1. Per operator and bit-width: activation-weighted relative reconstruction error and fit
   time per unit (median over a sample of units), against plain round-to-nearest (RTN:
   asymmetric per-row min-max with fp16 scale + zero, no salient weights) in the same run.
2. Per lever (issue 11) and bit-width: the output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (``H`` the
   input second moment) and fit time per unit of the fitted grid with 3% salient weights,
   + error feedback, + rotation (no salient weights), + both, + errors carried across the
   chunks of each linear (whole linears of the sampled units' layers), and the feedback/rotation
   levers again after Scale Folding, with true bits per weight.
3. Perplexity of uniform plans with our operators at 8/4/3/2 bits (3% salient) and of
   LSQ-4 without salient weights, against RTN at 4/3/2 bits with 256- and 64-column
   groups, each with its true bits.

    python benchmarks/operators.py --out benchmarks/results            # built-in corpus
    python benchmarks/operators.py --corpus wikitext2 --data-dir ../shared/data
    python benchmarks/operators.py --levers-only --out benchmarks/results/candidates

Writes ``operators.json`` and ``operators.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from windquant.calib.corpus import corpus_tokens
from windquant.calib.statistics import calibrate
from windquant.config import FitConfig
from windquant.eval.perplexity import perplexity
from windquant.model.units import enumerate_units
from windquant.pack.apply import plan_weights
from windquant.pipeline import calibration_windows, fit_settings, prepare
from windquant.quant.accounting import summarize
from windquant.quant.fold_search import fold_model
from windquant.quant.unit import FitSettings, dequantize_unit, quantize_linear, quantize_unit, relative_error
from windquant.runinfo import peak_rss_mib
from windquant.runtime.loading import load_model

RTN_SCALE_ZERO_BITS = 32  # fp16 scale + fp16 zero per row and group


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest per row and ``group`` columns (the baseline)."""
    out = torch.empty_like(w)
    qmax = 2**bits - 1
    for c0 in range(0, w.shape[1], group):
        g = w[:, c0 : c0 + group]
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        scale = ((hi - lo) / qmax).clamp_min(1e-8).half().float()
        zero = (-lo / scale).round().half().float()
        out[:, c0 : c0 + group] = (((g / scale).round() + zero).clamp(0, qmax) - zero) * scale
    return out.half().float()


def rtn_true_bits(bits: int, group: int) -> float:
    return bits + RTN_SCALE_ZERO_BITS / group


def error_table(model, units, scales, sample: int) -> list[dict]:
    modules = dict(model.named_modules())
    picked = units[:: max(1, len(units) // sample)][:sample]
    rows = []
    for action in (8.0, 4.0, 3.0, 2.0, 1.58, 1.0):
        errs, times = [], []
        for u in picked:
            w = modules[u.module].weight.detach()[:, u.col0 : u.col1].float()
            s = scales[u.module][u.col0 : u.col1]
            t0 = time.perf_counter()
            packed = quantize_unit(w, s, action, FitSettings())
            times.append(time.perf_counter() - t0)
            errs.append(relative_error(w, dequantize_unit(packed, action, *w.shape), s))
        rows.append(
            {"method": f"windquant {action:g}", "rel_error": statistics.mean(errs), "fit_ms": 1e3 * statistics.median(times)}
        )
    for bits in (8, 4, 3, 2):
        errs, times = [], []
        for u in picked:
            w = modules[u.module].weight.detach()[:, u.col0 : u.col1].float()
            t0 = time.perf_counter()
            w_hat = rtn(w, bits, u.columns)
            times.append(time.perf_counter() - t0)
            errs.append(relative_error(w, w_hat, scales[u.module][u.col0 : u.col1]))
        rows.append({"method": f"RTN {bits}", "rel_error": statistics.mean(errs), "fit_ms": 1e3 * statistics.median(times)})
    return rows


LEVERS = {
    "fitted grid, 3% salient": FitSettings(),
    "+ feedback": FitSettings(feedback=True),
    "rotation (no salient)": FitSettings(rotate=True),
    "rotation + feedback": FitSettings(rotate=True, feedback=True),
}


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    d = w.double() - w_hat.double()
    return float(((d @ h.double()) * d).sum()), float(((w.double() @ h.double()) * w.double()).sum())


def lever_table(
    model, units, scales, moments, sample: int, levers: dict[str, FitSettings] | None = None, carry: bool = True
) -> list[dict]:
    """Output error and fit time of each lever at 4/3/2 bits (see the module docstring)."""
    levers = LEVERS if levers is None else levers
    modules = dict(model.named_modules())
    picked = units[:: max(1, len(units) // sample)][:sample]
    layers = sorted({u.layer for u in picked})[:: max(1, len({u.layer for u in picked}) // 3)][:3]
    rows = []
    for action in (4.0, 3.0, 2.0):
        for name, settings in levers.items():
            num = den = 0.0
            times, bits = [], []
            for u in picked:
                w = modules[u.module].weight.detach()[:, u.col0 : u.col1].float()
                h = moments[u.module][u.col0 : u.col1, u.col0 : u.col1]
                t0 = time.perf_counter()
                packed = quantize_unit(w, scales[u.module][u.col0 : u.col1], action, settings, h, seed=u.index)
                times.append(time.perf_counter() - t0)
                e, n = output_error(w, dequantize_unit(packed, action, *w.shape), h)
                num, den = num + e, den + n
                bits.append(summarize([u.shape], [action], settings.salient_rate, settings.rotate).true_bits)
            rows.append(
                {
                    "bits": action,
                    "lever": name,
                    "output_error": num / den,
                    "fit_ms": 1e3 * statistics.median(times),
                    "true_bits": statistics.mean(bits),
                    "units": len(picked),
                }
            )
        if not carry:
            continue
        settings = LEVERS["rotation + feedback"]
        num = den = 0.0
        start, linears = time.perf_counter(), sorted({u.module for u in units if u.layer in layers})
        for name in linears:
            chunks = [(u.col0, u.col1, action, u.index, settings.rotate) for u in units if u.module == name]
            w, h = modules[name].weight.detach().float(), moments[name]
            packed = quantize_linear(w, h, chunks, settings)
            w_hat = torch.cat([dequantize_unit(p, action, w.shape[0], c1 - c0) for p, (c0, c1, *_rest) in zip(packed, chunks)], 1)
            e, n = output_error(w, w_hat, h)
            num, den = num + e, den + n
        n_chunks = sum(1 for u in units if u.layer in layers)
        rows.append(
            {
                "bits": action,
                "lever": f"rotation + feedback + carry (layers {layers})",
                "output_error": num / den,
                "fit_ms": 1e3 * (time.perf_counter() - start) / n_chunks,
                "true_bits": rows[-1]["true_bits"],
                "units": n_chunks,
            }
        )
    return rows


def lever_markdown(rows: list[dict], command: str) -> list[str]:
    md = [
        "## Levers: output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) and fit time per unit",
        "",
        f"Command: `{command}`",
        "",
        "| bits | lever | true bits | output error | fit ms/unit | units |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['bits']:g} | {r['lever']} | {r['true_bits']:.3f} | {r['output_error']:.5f} | {r['fit_ms']:.1f} | {r['units']} |"
        for r in rows
    ]
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="builtin")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--sample-units", type=int, default=48)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--levers-only", action="store_true", help="only the lever table (no perplexity runs) -> levers.md/json")
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tok = load_model(args.model)
    config = FitConfig(cache_dir=args.cache_dir, data_dir=args.data_dir)
    units = enumerate_units(model, config.chunk)
    if args.levers_only:
        stats = calibrate(model, calibration_windows(tok, config), moments=True)
        rows = lever_table(model, units, stats.act_scales, stats.moments, args.sample_units)
        # Folding is exact, so the folded linears' output errors are the same function's errors.
        alphas = fold_model(model, stats.act_scales, stats.moments, config.chunk, fit_settings(config))
        folded = {f"{k} + folding": v for k, v in LEVERS.items()}
        rows += lever_table(model, units, stats.act_scales, stats.moments, args.sample_units, folded, carry=False)
        rows.sort(key=lambda r: -r["bits"])
        print(f"fold alphas: mean {statistics.mean(alphas.values()):.3f}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "levers.json").write_text(json.dumps({"model": args.model, "calib": config.calib, "rows": rows}, indent=1))
        md = lever_markdown(rows, f"python benchmarks/operators.py --levers-only --out {args.out}")
        (out / "levers.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        return
    prepared = prepare(model, tok, config)
    scales = prepared.stats.act_scales
    errors = error_table(model, units, scales, args.sample_units)
    tokens = corpus_tokens(tok, args.corpus, "eval", args.data_dir)
    modules = dict(model.named_modules())

    def ppl(weight_of) -> float:
        with torch.no_grad(), plan_weights(model, units, weight_of):
            return perplexity(model, tokens, args.ctx, args.max_windows).ppl

    shapes = [u.shape for u in units]
    rows = [
        {
            "plan": "reference (fp32)",
            "true_bits": 32.0,
            "paper_bits": 32.0,
            "ppl": ppl(lambda u: modules[u.module].weight[:, u.col0 : u.col1]),
        }
    ]
    for action in (8.0, 4.0, 3.0, 2.0):
        s = summarize(shapes, [action] * len(units), config.salient)
        value = ppl(lambda u, a=action: prepared.cache.weight(u.index, a))
        rows.append(
            {
                "plan": f"windquant uniform {action:g} (salient 3%)",
                "true_bits": s.true_bits,
                "paper_bits": s.paper_bits,
                "ppl": value,
            }
        )
    no_salient = FitSettings(salient_rate=0.0)
    lsq4 = {
        u.index: dequantize_unit(
            quantize_unit(
                modules[u.module].weight.detach()[:, u.col0 : u.col1].float(), scales[u.module][u.col0 : u.col1], 4.0, no_salient
            ),
            4.0,
            *u.shape,
        )
        for u in units
    }
    s = summarize(shapes, [4.0] * len(units), 0.0)
    rows.append(
        {
            "plan": "windquant uniform 4 (no salient)",
            "true_bits": s.true_bits,
            "paper_bits": s.paper_bits,
            "ppl": ppl(lambda u: lsq4[u.index]),
        }
    )
    for bits, group in ((4, 256), (4, 64), (3, 64), (2, 64)):
        value = ppl(lambda u, b=bits, g=group: rtn(modules[u.module].weight.detach()[:, u.col0 : u.col1].float(), b, g))
        rows.append(
            {
                "plan": f"RTN {bits} bit, g{group}",
                "true_bits": rtn_true_bits(bits, group),
                "paper_bits": float(bits),
                "ppl": value,
            }
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model,
        "corpus": args.corpus,
        "ctx": args.ctx,
        "eval_tokens": int(tokens.numel()),
        "errors": errors,
        "uniform_plans": rows,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
    }
    (out / "operators.json").write_text(json.dumps(result, indent=1))
    md = [
        f"# Operators on {args.model} ({args.corpus} eval span, ctx {args.ctx})",
        "",
        f"Command: `python benchmarks/operators.py --corpus {args.corpus} --out {args.out}`",
        "",
        f"## Reconstruction error (mean over {args.sample_units} units) and fit time (median per unit)",
        "",
        "| method | rel. weighted error | fit ms/unit |",
        "|---|---|---|",
    ]
    md += [f"| {r['method']} | {r['rel_error']:.5f} | {r['fit_ms']:.1f} |" for r in errors]
    md += ["", "## Uniform plans", "", "| plan | true bits | paper bits | PPL |", "|---|---|---|---|"]
    md += [f"| {r['plan']} | {r['true_bits']:.3f} | {r['paper_bits']:.3f} | {r['ppl']:.2f} |" for r in rows]
    (out / "operators.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
