"""Where PPO episodes get their weights from: cost per episode and memory, per way of holding
the candidates (issue 12, item 3).

* ``packed``: nothing dense is kept; each episode dequantizes every unit's candidate from the
  packed shards;
* ``ram``: every candidate's fp16 weights held in RAM (``--dense-candidates ram``, the default);
* ``disk``: the same fp16 weights written once beside the cache and memory-mapped
  (``--dense-candidates disk``).

Each mode runs in its own process on a warm candidate cache: RSS after preparing, then ``--n``
alternations of one bare proxy forward and one full PPO episode (roll-out, proxy, update), so
both see the same machine load (``rl_vs_heuristic.episode_timing``). The issue's bar: median
episode / median bare forward <= 1.3.

    python benchmarks/episode_assembly.py --out benchmarks/results/episode_assembly
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchlib import command_line, pyplot, rss_mib, run_mode_workers, write_markdown

MODES = ("packed", "ram", "disk")


def worker(args: argparse.Namespace) -> dict:
    from rl_vs_heuristic import episode_timing

    from windquant.alloc.ppo import PPOConfig
    from windquant.config import FitConfig
    from windquant.pipeline import prepare
    from windquant.runinfo import set_threads
    from windquant.runtime.loading import load_model

    set_threads(args.threads)
    model, tok = load_model(args.model)
    fit = FitConfig(cache_dir=args.cache_dir, dense_candidates="ram" if args.worker == "packed" else args.worker)
    needs = {"features"} if args.worker == "packed" else {"features", "proxy"}
    prepared = prepare(model, tok, fit, needs, progress=False)
    after_prepare = rss_mib()
    cfg = PPOConfig()
    proxy = prepared.proxy(cfg.proxy_samples, cfg.proxy_len)
    timing = episode_timing(prepared, proxy, args.target_bits, "true", args.n)
    return {"mode": args.worker, "rss_after_prepare_mib": after_prepare, "peak_rss_mib": rss_mib("VmHWM"), **timing}


def write_outputs(out: Path, result: dict) -> None:
    from windquant.files import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    lines = [
        "# PPO episodes: where the plan's weights come from",
        "",
        f"{result['model']}, {result['target_bits']} true bits, PPO defaults (proxy {result['proxy']}), "
        f"{result['threads']} threads, warm candidate cache; medians over {result['n']} alternations of one bare "
        "proxy forward and one full episode (roll-out + proxy + PPO update), each mode in its own process.",
        "",
        "| mode | RSS after prepare (MiB) | peak RSS (MiB) | bare forward (s) | episode (s) | episode / bare |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['rss_after_prepare_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['median_bare_seconds']:.3f} | "
            f"{r['median_episode_seconds']:.3f} | **{r['ratio']:.2f}** |"
        )
    write_markdown(out, lines, result["command"])

    plt = pyplot()

    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r["mode"] for r in rows]
    ax1.bar(names, [r["ratio"] for r in rows], color="tab:blue")
    ax1.axhline(1.3, color="tab:red", linestyle="--", label="bar: 1.3")
    ax1.set_ylabel("episode / bare forward")
    ax1.legend(fontsize=8)
    ax2.bar(names, [r["rss_after_prepare_mib"] for r in rows], color="tab:green")
    ax2.set_ylabel("RSS after prepare (MiB)")
    fig.tight_layout()
    fig.savefig(out / "episode_assembly.png", dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--target-bits", type=float, default=2.5)
    p.add_argument("--n", type=int, default=10, help="alternations of bare forward and episode per mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="benchmarks/results/episode_assembly")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from windquant.alloc.ppo import PPOConfig

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    flags = {
        "model": args.model,
        "target-bits": args.target_bits,
        "n": args.n,
        "threads": args.threads,
        "cache-dir": args.cache_dir,
    }
    rows = run_mode_workers(__file__, modes, flags)
    result = {
        "model": args.model,
        "target_bits": args.target_bits,
        "threads": args.threads,
        "n": args.n,
        "proxy": f"{PPOConfig.proxy_samples} x {PPOConfig.proxy_len} tokens",
        "rows": rows,
        "command": command_line(),
    }
    write_outputs(Path(args.out), result)
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
