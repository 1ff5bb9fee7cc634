"""GAMMA: per-unit preferences over the cached candidates, learned on the real decoder blocks
under an augmented Lagrangian on the expected bits, then projected by the exact knapsack.

Training, block by block (``ctx.reconstruction``: teacher-forced inputs, output error weighted
by the loss gradient, so every block's error is in nats per token):

* each unit ``i`` has logits ``θ_i`` over the actions; its weight in the forward pass is the
  mixture ``Σ_a softmax(θ_i/τ)_a · W_i(a)`` of its candidates, with the temperature ``τ``
  annealed geometrically from ``tau_start`` to ``tau_end`` over the block's steps, so the last
  steps see (almost) one candidate per unit: a deterministic softmax relaxation (no Gumbel
  noise: with tens of steps per block its variance costs more than its bias);
* the block minimises ``error + μ·N·g + ρ/2·N·max(g, 0)²`` with ``g`` the expected bits per weight
  of the whole model (``Σ_i p_i · bits_i / N``) minus the budget: the trained blocks at their
  learned preferences, the others at their initial ones. After each block the multiplier takes
  the method-of-multipliers step ``μ ← max(0, μ + ρ·g)``, so training ends near the budget;
* the logits start at the sensitivity scores (``init="scores"``): ``θ = −(c + μ₀·bits)/s`` with
  ``μ₀`` the price of a bit at which the initial preferences expect exactly the budget, and ``s``
  the spread of the scores. Training then corrects the additive scores with what the block's
  real output shows.

Projection: the preferences become costs ``−s·θ_i(a) − μ_l·bits_i(a)`` — the learned loss of each
action, with the bit price its block was trained at taken back out, so blocks trained at
different multipliers compare — and the multiple-choice knapsack of the ``ilp`` allocator picks
the plan that meets any budget exactly. One table serves every budget (``train_bits``): it is
cached beside the runs, checkpointed after every block, and a killed run resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from windquant.actions import ACTIONS
from windquant.alloc.base import Allocation, AllocationContext, register_allocator
from windquant.config import config_to_dict, require, setting, settings_digest
from windquant.errors import WindquantError

if TYPE_CHECKING:
    import torch

    from windquant.alloc.base import BlockTask
    from windquant.alloc.problem import AllocationProblem

CURVE = "gamma_curve.png"


@dataclass
class GammaConfig:
    steps: int = setting(48, "optimisation steps per decoder block", flag="--gamma-steps")
    train_bits: float | None = setting(
        None, "budget the preferences are trained at (default: the target); any other target re-projects the same table", flag="--gamma-train-bits"
    )
    batch: int = 8  # calibration windows per step (the default 64 windows: 8 batches, visited in turn)
    lr: float = 0.05  # Adam on the logits
    tau_start: float = 1.0  # softmax temperature of the first step of a block
    tau_end: float = 0.05  # ... and of its last: nearly one candidate per unit
    penalty: float = 4.0  # ρ = penalty · μ₀: a violation of 1/penalty bits per weight doubles the bit price
    init: str = "scores"  # "scores": logits from the sensitivity scores at the budget; "uniform": all zero
    time_limit: float = 30.0  # seconds HiGHS may search per projection

    def validate(self) -> GammaConfig:
        checks = (
            ("steps", self.steps >= 1, ">= 1"),
            ("batch", self.batch >= 1, ">= 1"),
            ("tau_end", 0 < self.tau_end <= self.tau_start, "in (0, tau_start]"),
            ("penalty", self.penalty >= 0, ">= 0"),
            ("init", self.init in ("scores", "uniform"), "'scores' or 'uniform'"),
        )
        require(self, checks, "gamma ")
        return self


@dataclass
class Preferences:
    """The learned table: enough to project to any budget, and to resume training."""

    theta: torch.Tensor  # [N, A] logits
    prior: torch.Tensor  # [N] bits each unit is expected to take before its block is trained
    scale: float  # s: cost units per logit
    price: torch.Tensor  # [L] bit price μ each block was trained at (cost units per bit)
    mu: float  # the multiplier now
    mu0: float  # ... and at the start (sets ρ)
    done: int  # blocks trained
    log: list[dict]  # one row per optimisation step

    def costs(self, units_layer: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """[N, A] learned loss of each unit's actions (the projection's costs)."""
        return -self.scale * self.theta.double() - self.price.double()[units_layer][:, None] * bits


# -- pure math ----------------------------------------------------------------
def expected_bits(logits: torch.Tensor, bits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Σ_i Σ_a softmax(θ_i/τ)_a · bits_i(a)."""
    return (logits.div(tau).softmax(-1) * bits).sum()


def soft_price(costs: torch.Tensor, bits: torch.Tensor, scale: float, budget: float) -> float:
    """The bit price μ ≥ 0 at which preferences ``softmax(−(c + μ·bits)/s)`` expect ``budget``
    bits (expected bits fall as μ rises: bracket by doubling twice, then bisect)."""
    def spent(mu: float) -> float:
        return float(expected_bits(-(costs + mu * bits) / scale, bits))

    if spent(0.0) <= budget:
        return 0.0
    lo, hi = 0.0, 1.0
    while spent(hi) > budget:
        lo, hi = hi, hi * 4
        if hi > 1e30:
            raise WindquantError(f"gamma: no bit price brings the expected bits down to {budget:.0f}")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) > budget else (lo, mid)
    return hi


def initial_preferences(costs: torch.Tensor, bits: torch.Tensor, budget: float, layers: int, init: str) -> Preferences:
    """Logits before training: from the scores at the budget's price, or uniform (then the scores
    only set the scale and the price)."""
    import torch

    costs = costs.double()
    scale = float(costs.std(dim=1).median().clamp_min(1e-30))
    mu0 = soft_price(costs, bits, scale, budget)  # the price of a bit in the scores' units
    theta = -(costs + mu0 * bits) / scale
    theta = theta - theta.max(dim=1, keepdim=True).values  # logits are shift-invariant; keep them near 0
    # Whatever the start, the blocks not trained yet count at the scores' expected bits: they meet
    # the budget together, so each block is asked for its share, not for the others' excess.
    prior = (theta.softmax(-1) * bits).sum(-1).float()
    if init == "uniform":
        theta = torch.zeros_like(theta)
    price = torch.full((layers,), mu0, dtype=torch.float64)
    return Preferences(theta.float(), prior, scale, price, mu0, max(mu0, 1e-30), 0, [])


def mixture(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Σ_a probs[a] · candidates[a] ([A] × [A, out, cols] -> [out, cols])."""
    import torch

    return torch.einsum("a,aoc->oc", probs, candidates)


def temperature(step: int, steps: int, start: float, end: float) -> float:
    """Geometric schedule from ``start`` (step 0) to ``end`` (the last step)."""
    return start * (end / start) ** (step / max(steps - 1, 1))


@dataclass
class Budget:
    """The bits side of the problem, as training sees it."""

    bits: torch.Tensor  # [N, A] float32, per requested action
    layer_of: torch.Tensor  # [N] each unit's block
    total: float  # bits allowed
    n_weights: int


def train_block(task: BlockTask, prefs: Preferences, layer: int, budget: Budget, config: GammaConfig) -> None:
    """Optimise block ``layer``'s logits in ``prefs`` on ``task``, moving the multiplier as it goes."""
    import torch

    rows = torch.tensor(task.units)
    bits, layer_of, n_weights = budget.bits, budget.layer_of, budget.n_weights
    trained = layer_of < layer
    other_bits = float(expected_bits(prefs.theta[trained], bits[trained], config.tau_end) + prefs.prior[layer_of > layer].sum())
    logits = prefs.theta[rows].clone().requires_grad_(True)
    block_bits = bits[rows]
    rho = config.penalty * prefs.mu0
    opt = torch.optim.Adam([logits], lr=config.lr)
    prefs.price[layer] = prefs.mu
    for step in range(config.steps):
        t = temperature(step, config.steps, config.tau_start, config.tau_end)
        probs = logits.div(t).softmax(-1)
        error = task.loss([mixture(probs[k], c) for k, c in enumerate(task.candidates)], step % task.batches)
        g = (other_bits + (probs * block_bits).sum() - budget.total) / n_weights  # bits per weight over the budget
        objective = error + n_weights * (prefs.mu * g + rho / 2 * g.clamp_min(0) ** 2)
        opt.zero_grad()
        objective.backward()
        opt.step()
        row = {"layer": layer, "step": step, "tau": t, "error": float(error.detach()), "over_bits": float(g.detach()), "mu": prefs.mu}
        prefs.log.append(row)
        # Method of multipliers, spread over the block's steps: μ ← max(0, μ + ρ·g) per block.
        prefs.mu = max(0.0, prefs.mu + rho * float(g.detach()) / config.steps)
    prefs.theta[rows] = logits.detach()
    prefs.price[layer] = (prefs.price[layer] + prefs.mu) / 2  # the price the block saw, on average
    prefs.done = layer + 1


# -- the table on disk ----------------------------------------------------------
def save_preferences(prefs: Preferences, path: Path, config: GammaConfig, train_bits: float) -> None:
    from windquant.quant.cache import atomic_save_tensors

    meta = {
        "scale": prefs.scale,
        "mu": prefs.mu,
        "mu0": prefs.mu0,
        "done": prefs.done,
        "train_bits": train_bits,
        "config": config_to_dict(config),
        "actions": list(ACTIONS),
    }
    tensors = {"theta": prefs.theta.contiguous(), "prior": prefs.prior.contiguous(), "price": prefs.price.contiguous()}
    atomic_save_tensors(tensors, path, {"gamma": json.dumps(meta), "log": json.dumps(prefs.log)})


def load_preferences(path: Path) -> Preferences | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from windquant.quant.cache import shard_is_complete

    if not shard_is_complete(path):
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    gamma, tensors = json.loads(meta["gamma"]), load_file(str(path))
    if gamma["actions"] != list(ACTIONS):
        return None
    return Preferences(tensors["theta"], tensors["prior"], gamma["scale"], tensors["price"], gamma["mu"], gamma["mu0"], gamma["done"], json.loads(meta["log"]))


def plot_curve(prefs: Preferences, png: Path, train_bits: float) -> None:
    """Block error per step, expected bits against the budget, and the multiplier."""
    from windquant.reports import pyplot

    plt = pyplot()
    steps = range(len(prefs.log))
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(steps, [r["error"] for r in prefs.log], lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("block output error (nats/token)")
    axes[1].plot(steps, [train_bits + r["over_bits"] for r in prefs.log], lw=0.8, label="expected")
    axes[1].axhline(train_bits, ls="--", color="gray", label="budget")
    axes[1].set_ylabel("bits per weight")
    axes[1].legend()
    axes[2].plot(steps, [r["mu"] for r in prefs.log], color="tab:red")
    axes[2].set_ylabel("bit price μ")
    axes[2].set_xlabel("optimisation step (blocks in order)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# -- the allocator ----------------------------------------------------------------
def train_preferences(problem: AllocationProblem, config: GammaConfig, ctx: AllocationContext, train_bits: float, path: Path) -> Preferences:
    """The table trained at ``train_bits`` (loaded, resumed, or trained now; saved after every block)."""
    import torch
    from tqdm.auto import tqdm

    layer_of = torch.tensor([u.layer for u in problem.units])
    budget = Budget(problem.bits.float(), layer_of, train_bits * problem.n_weights, problem.n_weights)
    layers = int(layer_of.max()) + 1
    prefs = load_preferences(path)
    if prefs is not None and prefs.done == layers:
        return prefs
    if prefs is None:
        prefs = initial_preferences(problem.costs, problem.bits, budget.total, layers, config.init)
    else:
        tqdm.write(f"windquant: resuming gamma training at block {prefs.done} of {layers} ({path.name})")
    recon = ctx.reconstruction(config.batch)
    with torch.enable_grad():
        for layer in tqdm(range(prefs.done, layers), desc="gamma", disable=not ctx.progress, unit="block"):
            train_block(recon.block(layer), prefs, layer, budget, config)
            save_preferences(prefs, path, config, train_bits)
    return prefs


@register_allocator(
    "gamma",
    GammaConfig,
    needs=("scores", "reconstruction"),
    help="preferences learned on the real blocks under a Lagrangian, projected by the exact knapsack (GAMMA)",
)
def allocate(problem: AllocationProblem, config: GammaConfig, ctx: AllocationContext) -> Allocation:
    import torch

    from windquant.alloc.ilp import solve

    config.validate()
    if ctx.reconstruction is None or problem.costs is None:
        raise WindquantError("the gamma allocator needs the model's blocks: make the plan with windquant.pipeline.make_plan")
    train_bits = problem.target_bits if config.train_bits is None else config.train_bits
    # Named by what it computes: a table trained at 2.5 is the same whether 2.5 was the target or given.
    digest = settings_digest(replace(config, train_bits=train_bits), {"accounting": problem.accounting})
    folder = ctx.work_dir.parent  # shared by every target: one table serves them all
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"preferences-{problem.accounting}-{train_bits:g}-{digest}.safetensors"
    start = time.perf_counter()
    prefs = train_preferences(problem, config, ctx, train_bits, path)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    layer_of = torch.tensor([u.layer for u in problem.units])
    sol = solve(prefs.costs(layer_of, problem.bits), problem.bits, problem.budget, time_limit=config.time_limit)
    projected = time.perf_counter() - start
    curve = folder / f"{path.stem}.png"
    if not curve.is_file():
        plot_curve(prefs, curve, train_bits)
    expected = float(expected_bits(prefs.theta, problem.bits.float(), config.tau_end)) / problem.n_weights
    info = {
        "train_bits": train_bits,
        "expected_bits_after_training": expected,
        "table": path.name,
        "seconds_to_train_or_load": round(trained, 2),
        "seconds_to_project": round(projected, 3),
        "method": sol.method,
        "final_multiplier": prefs.mu,
    }
    return Allocation([ACTIONS[j] for j in sol.choice], info, files=[path, curve])
