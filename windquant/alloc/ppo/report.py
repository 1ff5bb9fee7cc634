"""Training-curve figure of a PPO run, read back from its ``episodes.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_episodes(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_curve(log_path: Path, png: Path) -> None:
    """Proxy PPL, bits vs target, episode reward and λ per episode (four panels)."""
    opened = episode_panels(log_path)
    if opened is None:
        return
    rows, ep, plt, fig, axes = opened
    ax = axes[0][0]
    ax.plot(ep, [r["proxy_ppl"] for r in rows], marker=".")
    ax.set_yscale("log")
    ax.set_ylabel("proxy perplexity")
    ax = axes[0][1]
    for key in ("true_bits", "paper_bits"):
        if key in rows[0]:
            ax.plot(ep, [r[key] for r in rows], label=key.replace("_", " "))
    ax.plot(ep, [r["target"] for r in rows], linestyle="--", color="gray", label="target")
    ax.set_ylabel("bits per weight")
    ax.legend()
    axes[1][0].plot(ep, [r["reward"] for r in rows], color="tab:green")
    axes[1][0].set_ylabel("episode-end reward")
    axes[1][1].plot(ep, [r["lambda"] for r in rows], color="tab:red")
    axes[1][1].set_ylabel("Lagrange multiplier λ")
    save_episode_panels(plt, fig, axes, png)


def episode_panels(log_path: Path):
    """(rows, episodes, pyplot, figure, 2×2 axes) for a per-episode figure; None for an empty log."""
    rows = read_episodes(log_path)
    if not rows:
        return None
    from windquant.reports import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    return rows, [r["episode"] for r in rows], plt, fig, axes


def save_episode_panels(plt, fig, axes, png: Path) -> None:
    """A 2×2 per-episode figure's common finish (x labels, grids), written to ``png``."""
    for a in axes[1]:
        a.set_xlabel("episode")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
