"""GAMMA: per-unit preferences over the cached candidates, learned on the real decoder blocks
under an augmented Lagrangian on the expected bits, then projected by the exact knapsack.

What is learned is a cost per unit and action, in nats, like the sensitivity scores it starts
from. The preferences are a softmax of those costs plus the bit price:
``p_i = softmax(−(ĉ_i + λ·bits_i)/(s·τ))``. The price is never written into the costs, so the
table is the same whatever price a block was trained at, and any budget can be projected from it.

Training, block by block (``ctx.reconstruction``: teacher-forced inputs, output error weighted
by the loss gradient, so every block's error is in nats per token):

* each unit's weight in the forward pass is the mixture ``Σ_a p_i(a) · W_i(a)`` of its
  candidates. The temperature ``τ`` is annealed geometrically from ``tau_start`` to ``tau_end``
  over the block's steps, so the last steps see (almost) the plan the projection will pick. This
  is a deterministic softmax relaxation with no Gumbel noise: with tens of steps per block, the
  noise's variance would cost more than its bias;
* the costs take mirror-descent steps on the simplex: ``ĉ_i(a) += η·(∂E/∂p_i(a) − Σ_b p_i(b)·∂E/∂p_i(b))``,
  ``η = strength/steps``, so the learned cost is the score plus the average in-context gradient.
  ``∂E/∂p_i(a) = ⟨∇_{W_i} E, W_i(a)⟩`` is the first-order change of the block's error when
  probability moves to action ``a``. The scores already count the unit's own error, so only its
  interaction with the rest of the block should be added. Two ways (``interactions``):

  - ``"modules"`` (the default, ``module_gradient``): the gradient is taken with the unit's whole
    linear at its unquantized weight and every other linear at its mixture. There the block error
    has no first-order term of its own, so what is measured is the interaction with the other
    linears' errors alone; chunks of the same linear are left to the carry step, which
    compensates them when the plan is stored. One backward pass per linear and step (16 steps a
    block: ~14 min on SmolLM2, 2 cores);
  - ``"block"`` (session 12): one pass with every unit at its mixture, the own part
    ``2·Σ_b p_i(b)·ρ_ab·√(c_i(a)·c_i(b))`` taken out through the scores and the correlation
    ``ρ`` of the candidates' errors (``cross_gradient``). It leaks whatever the block's own error
    and the scores disagree on.

  Everything is in nats, so sensitive units move more than insensitive ones.
* the constraint is the whole model's expected bits per weight over the budget, ``g``: the
  trained blocks at the current price, the others at the scores' preferences at the budget. The
  augmented Lagrangian ``μ·g + ρ/2·max(g, 0)²`` prices a bit at ``λ = μ + ρ·max(g, 0)``, and the
  multiplier takes the method-of-multipliers step ``μ ← max(0, μ + ρ·g)``, spread over each
  block's steps. ``μ`` starts at ``μ₀``, the price at which the scores' preferences expect exactly
  the budget (``init="scores"``), or at 0 (``init="free"``).

Projection: the learned costs go to the multiple-choice knapsack of the ``ilp`` allocator, which
picks the plan that meets any budget exactly, each unit's correction first clipped to ``±trust``
times its own score (``trusted_costs``): on SmolLM2 the teacher-forced error of blocks 11 and 28
gives them corrections of 2–6× their scores at 1–2 bits, which the knapsack then pays for in
bits that the real loss does not reward. Untrained, the table is the scores, and the projection
is ilp's plan. One table serves every budget (``train_bits``). It is cached beside the runs,
checkpointed after every block, and a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from windquant.actions import ACTIONS, SKIP, bits_name
from windquant.alloc.base import Allocation, AllocationContext, register_allocator
from windquant.config import config_to_dict, require, setting, settings_digest
from windquant.errors import WindquantError

if TYPE_CHECKING:
    import torch

    from windquant.alloc.base import BlockTask
    from windquant.alloc.problem import AllocationProblem

TABLE_VERSION = 3  # part of a table's name: bump it when training changes, so no stale table is reused


@dataclass
class GammaConfig:
    steps: int = setting(16, "optimisation steps per decoder block", flag="--gamma-steps")
    train_bits: float | None = setting(
        None,
        "budget the preferences are trained at; any other target re-projects the same table",
        flag="--gamma-train-bits",
        shown="--target-bits",
        metavar="BITS",
    )
    batch: int = 8  # calibration windows per step (the default 64 windows: 8 batches, visited in turn)
    strength: float = 1.0  # the steps add up to this many times the average in-context gradient, in nats
    # What the gradient against a unit's preferences sees, beyond the unit's own error that the
    # scores already count: "modules" (default), the other linears' errors only — one pass per
    # linear with that linear at its unquantized weight, so neither the unit's own error nor its
    # own linear's other chunks enter (the carry step compensates those when the plan is stored);
    # "block", every other unit's error, the unit's own part taken out through the correlation of
    # its candidates' errors (one pass per step; session 12).
    interactions: str = "modules"
    tau_start: float = 1.0  # softmax temperature of the first step of a block
    tau_end: float = 0.05  # ... and of its last: nearly the plan the projection picks
    penalty: float = 4.0  # ρ = penalty · μ₀: a violation of 1/penalty bits per weight doubles the bit price
    init: str = "scores"  # the multiplier starts at "scores": the budget's price μ₀; "free": 0
    time_limit: float = 30.0  # seconds HiGHS may search per projection
    # Trust region of the projection: each unit's learned correction (relative to its unquantized
    # column) is clipped to ±trust × its own score there; inf = as learned. Projection only, so
    # not part of the table's name. Why: the teacher-forced error overstates a few blocks
    # (SmolLM2's blocks 11 and 28 learned corrections of 2–6x their scores at 1–2 bits), and
    # their costs then buy them bits the real loss does not reward.
    trust: float = setting(
        0.3,
        "clip each learned correction to this fraction of the unit's score at projection (inf: as learned)",
        flag="--gamma-trust",
        run=True,
    )

    def validate(self) -> GammaConfig:
        checks = (
            ("steps", self.steps >= 1, ">= 1"),
            ("batch", self.batch >= 1, ">= 1"),
            ("strength", self.strength >= 0, ">= 0"),
            ("tau_end", 0 < self.tau_end <= self.tau_start, "in (0, tau_start]"),
            ("penalty", self.penalty >= 0, ">= 0"),
            ("init", self.init in ("scores", "free"), "'scores' or 'free'"),
            ("trust", self.trust >= 0, ">= 0"),
            ("interactions", self.interactions in ("modules", "block"), "'modules' or 'block'"),
        )
        require(self, checks, "gamma ")
        return self


@dataclass
class Preferences:
    """The learned table: enough to project to any budget, and to resume training."""

    costs: torch.Tensor  # [N, A] float64 learned loss of each unit's actions, nats (the projection's costs)
    prior: torch.Tensor  # [N] bits each unit is expected to take before its block is trained
    scale: float  # s: cost units per logit
    mu: float  # the multiplier now (nats per bit)
    mu0: float  # the budget's price under the scores (sets ρ)
    done: int  # blocks trained
    log: list[dict]  # one row per optimisation step


# -- pure math ----------------------------------------------------------------
def preferences(costs: torch.Tensor, bits: torch.Tensor, price: float, scale: float, tau: float = 1.0) -> torch.Tensor:
    """[N, A] softmax(−(c + price·bits)/(scale·τ)) per unit."""
    return (-(costs + price * bits) / (scale * tau)).softmax(-1)


def expected_bits(probs: torch.Tensor, bits: torch.Tensor) -> float:
    """Σ_i Σ_a p_i(a) · bits_i(a)."""
    return float((probs * bits).sum())


def soft_price(costs: torch.Tensor, bits: torch.Tensor, scale: float, budget: float) -> float:
    """The bit price μ ≥ 0 at which ``preferences(costs, bits, μ, scale)`` expect ``budget``
    bits (expected bits fall as μ rises: bracket by quadrupling, then bisect)."""

    def spent(mu: float) -> float:
        return expected_bits(preferences(costs, bits, mu, scale), bits)

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


def initial_preferences(costs: torch.Tensor, bits: torch.Tensor, budget: float, init: str) -> Preferences:
    """The table before training: the scores, and the price at which they expect the budget."""
    costs, bits = costs.double(), bits.double()
    scale = float(costs.std(dim=1).median().clamp_min(1e-30))
    mu0 = soft_price(costs, bits, scale, budget)  # the price of a bit in the scores' units
    # The blocks not trained yet count at the scores' expected bits: they meet the budget
    # together, so each block is asked for its share, not for the others' excess.
    prior = (preferences(costs, bits, mu0, scale) * bits).sum(-1)
    mu = mu0 if init == "scores" else 0.0
    return Preferences(costs.clone(), prior, scale, mu, max(mu0, 1e-30), 0, [])


def mixture(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Σ_a probs[a] · candidates[a] ([A] × [A, out, cols] -> [out, cols])."""
    import torch

    return torch.einsum("a,aoc->oc", probs, candidates)


def temperature(step: int, steps: int, start: float, end: float) -> float:
    """Geometric schedule from ``start`` (step 0) to ``end`` (the last step)."""
    return start * (end / start) ** (step / max(steps - 1, 1))


def penalized_price(mu: float, rho: float, over_at: Callable[[float], float]) -> float:
    """The price ``λ = μ + ρ·max(g(λ), 0)`` at which the augmented Lagrangian's price meets the
    violation it causes (``over_at``: λ -> g, falling as λ rises). Solved by bisection rather than
    lagged a step, which makes the price swing between over and under the budget."""
    if over_at(mu) <= 0 or rho == 0:
        return mu
    lo, hi = mu, mu + rho * over_at(mu)  # f(λ) = λ − μ − ρ·g(λ) rises from < 0 at lo to >= 0 at hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - mu - rho * max(over_at(mid), 0.0) < 0 else (lo, mid)
    return hi


def error_correlation(candidates: torch.Tensor, reference: int) -> torch.Tensor:
    """[A, A] correlation of a unit's candidate errors ``W(a) − W(reference)`` (Frobenius; 0 for
    an error of 0). Errors of neighbouring widths correlate (0.2–0.5 on SmolLM2 at 1–3 bits)."""
    errors = (candidates - candidates[reference]).flatten(1).double()
    gram = errors @ errors.T
    norm = gram.diagonal().sqrt()
    return gram / (norm[:, None] * norm[None]).clamp_min(1e-300)


def cross_gradient(grad: torch.Tensor, probs: torch.Tensor, scores: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
    """``∂E/∂p`` less each unit's own part: the gradient of a quadratic block error
    ``E = (Σ_j e_j)ᵀ H (Σ_j e_j)`` at the mixture ``e_i = Σ_b p_i(b)·e_i(b)`` is ``2·H·Σ_j e_j``; its
    own term against ``e_i(a)`` is ``2·Σ_b p_i(b)·e_i(b)ᵀ H e_i(a) = 2·Σ_b p_i(b)·ρ_ab·√(c_a·c_b)``
    with the scores ``c_i(a) = e_i(a)ᵀ H e_i(a)`` and ``ρ`` the errors' correlation under ``H``
    ([N, A] grad, probs, scores; [N, A, A] corr)."""
    import torch

    root = scores.clamp_min(0).sqrt()
    own = 2 * root * torch.einsum("nb,nab,nb->na", probs, corr, root)
    return grad - own


def mirror_step(costs: torch.Tensor, grad: torch.Tensor, probs: torch.Tensor, step_size: float) -> torch.Tensor:
    """``costs + step_size·(∂E/∂p − Σ_a p(a)·∂E/∂p(a))`` per unit: exponentiated gradient on
    the simplex, written on the costs (the per-unit mean is taken out: the softmax and the
    knapsack ignore a constant per unit, and the costs stay near the scores in magnitude)."""
    return costs + step_size * (grad - (probs * grad).sum(-1, keepdim=True))


def module_gradient(task: BlockTask, probs: torch.Tensor, batch: int, reference: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block error at the mixture, and ``∂E/∂p_i(a) = ⟨∇_{W_i} E, W_i(a)⟩`` taken with unit
    ``i``'s whole linear at its ``reference`` candidate and every other linear at its mixture
    ([N, A] float64). At the unquantized linear the block error has no first-order term of its
    own, so this is the linear's interaction with the others' errors alone: for a quadratic error
    ``Σ_mn e_mᵀ A_mn e_n`` it is ``2·e_i(a)ᵀ Σ_{n≠m} A_mn e_n``. One backward pass per linear."""
    import torch

    with torch.no_grad():
        mixed = [mixture(probs[k], c) for k, c in enumerate(task.candidates)]
        error = task.loss(mixed, batch)
    grad = torch.zeros(probs.shape, dtype=torch.float64)
    for positions in task.columns.values():
        weights = list(mixed)
        leaves = [task.candidates[k][reference].clone().requires_grad_(True) for k in positions]
        for k, leaf in zip(positions, leaves):
            weights[k] = leaf
        for k, g in zip(positions, torch.autograd.grad(task.loss(weights, batch), leaves)):
            grad[k] = torch.einsum("oc,aoc->a", g.double(), task.candidates[k].double())
    return error, grad


def trusted_costs(costs: torch.Tensor, scores: torch.Tensor, trust: float) -> torch.Tensor:
    """The projection's costs: the scores plus each unit's learned correction, both taken
    relative to the unit's unquantized column, the correction clipped to ``±trust·score`` there
    (a constant per unit changes no plan, so none is kept)."""
    import torch

    skip = ACTIONS.index(SKIP)
    own = (scores - scores[:, skip : skip + 1]).clamp_min(0)
    correction = (costs - scores) - (costs - scores)[:, skip : skip + 1]
    if math.isfinite(trust):
        correction = torch.minimum(torch.maximum(correction, -trust * own), trust * own)
    return scores + correction


@dataclass
class Budget:
    """The bits side of the problem, as training sees it."""

    bits: torch.Tensor  # [N, A] float64, per requested action
    scores: torch.Tensor  # [N, A] float64, the sensitivity scores (each unit's own error, nats)
    layer_of: torch.Tensor  # [N] each unit's block
    total: float  # bits allowed
    n_weights: int


def train_block(task: BlockTask, prefs: Preferences, layer: int, budget: Budget, config: GammaConfig) -> None:
    """Learn block ``layer``'s costs in ``prefs`` on ``task``, moving the multiplier as it goes."""
    import torch

    rows = torch.tensor(task.units)
    bits, layer_of, n_weights = budget.bits, budget.layer_of, budget.n_weights
    trained, untrained = layer_of < layer, layer_of > layer
    costs, block_bits, block_scores = prefs.costs[rows].clone(), bits[rows], budget.scores[rows]
    rho = config.penalty * prefs.mu0
    skip = ACTIONS.index(SKIP)  # the 16-bit candidate stands for the unquantized weight
    corr = torch.stack([error_correlation(c, skip) for c in task.candidates]) if config.interactions == "block" else None
    untrained_bits = float(prefs.prior[untrained].sum())
    for step in range(config.steps):
        t = temperature(step, config.steps, config.tau_start, config.tau_end)

        def over_at(price: float, costs: torch.Tensor = costs, t: float = t) -> float:
            """Bits per weight over the budget at ``price``: the trained blocks at the last
            temperature, this one at this step's, the rest at their prior."""
            spent = expected_bits(
                preferences(prefs.costs[trained], bits[trained], price, prefs.scale, config.tau_end), bits[trained]
            )
            spent += untrained_bits + expected_bits(preferences(costs, block_bits, price, prefs.scale, t), block_bits)
            return (spent - budget.total) / n_weights

        price = penalized_price(prefs.mu, rho, over_at)  # ∂/∂g of μ·g + ρ/2·max(g, 0)², per bit
        over = over_at(price)
        p = preferences(costs, block_bits, price, prefs.scale, t)
        if config.interactions == "modules":
            error, grad = module_gradient(task, p.float(), step % task.batches, skip)
        else:
            probs = p.float().requires_grad_(True)
            error = task.loss([mixture(probs[k], c) for k, c in enumerate(task.candidates)], step % task.batches)
            (grad,) = torch.autograd.grad(error, probs)
            grad = cross_gradient(grad.double(), p, block_scores, corr)
        costs = mirror_step(costs, grad, p, config.strength / config.steps)
        row = {
            "layer": layer,
            "step": step,
            "tau": t,
            "error": float(error.detach()),
            "over_bits": over,
            "mu": prefs.mu,
            "price": price,
        }
        prefs.log.append(row)
        # Method of multipliers, spread over the block's steps: μ ← max(0, μ + ρ·g) per block.
        prefs.mu = max(0.0, prefs.mu + rho * over / config.steps)
    prefs.costs[rows] = costs
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
    tensors = {"costs": prefs.costs.contiguous(), "prior": prefs.prior.contiguous()}
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
    if gamma["actions"] != list(ACTIONS) or "costs" not in tensors:  # another action set, or a pre-session-12 table of logits
        return None
    return Preferences(
        tensors["costs"], tensors["prior"], gamma["scale"], gamma["mu"], gamma["mu0"], gamma["done"], json.loads(meta["log"])
    )


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
def train_preferences(
    problem: AllocationProblem, config: GammaConfig, ctx: AllocationContext, train_bits: float, path: Path
) -> Preferences:
    """The table trained at ``train_bits`` (loaded, resumed, or trained now; saved after every block)."""
    import torch
    from tqdm.auto import tqdm

    layer_of = torch.tensor([u.layer for u in problem.units])
    budget = Budget(problem.bits.double(), problem.costs.double(), layer_of, train_bits * problem.n_weights, problem.n_weights)
    layers = int(layer_of.max()) + 1
    prefs = load_preferences(path)
    if prefs is not None and prefs.done == layers:
        return prefs
    if prefs is None:
        prefs = initial_preferences(problem.costs, problem.bits, budget.total, config.init)
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
    from windquant.alloc.ilp import solve

    config.validate()
    if ctx.reconstruction is None or problem.costs is None:
        raise WindquantError("the gamma allocator needs the model's blocks: make the plan with windquant.pipeline.make_plan")
    train_bits = problem.target_bits if config.train_bits is None else config.train_bits
    # Named by what it computes: a table trained at 2.5 is the same whether 2.5 was the target or
    # given; the scores it starts from (fisher or block) are part of its name.
    scores = hashlib.sha1(problem.costs.double().numpy().tobytes()).hexdigest()[:16]
    # The accounting by its bits' name ("true" for stored), the name tables were written under.
    accounting = bits_name(problem.accounting)
    digest = settings_digest(
        replace(config, train_bits=train_bits), {"accounting": accounting, "scores": scores, "version": TABLE_VERSION}
    )
    folder = ctx.work_dir.parent  # shared by every target: one table serves them all
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"preferences-{accounting}-{train_bits:g}-{digest}.safetensors"
    start = time.perf_counter()
    prefs = train_preferences(problem, config, ctx, train_bits, path)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    sol = solve(
        trusted_costs(prefs.costs, problem.costs.double(), config.trust),
        problem.bits,
        problem.budget,
        time_limit=config.time_limit,
    )
    projected = time.perf_counter() - start
    curve = folder / f"{path.stem}.png"
    if not curve.is_file():
        plot_curve(prefs, curve, train_bits)
    info = {
        "train_bits": train_bits,
        "expected_bits_after_training": train_bits + prefs.log[-1]["over_bits"],  # at the last step
        "table": path.name,
        "seconds_to_train_or_load": round(trained, 2),
        "seconds_to_project": round(projected, 3),
        "method": sol.method,
        "final_multiplier": prefs.mu,
        "trust": config.trust,
    }
    return Allocation([ACTIONS[j] for j in sol.choice], info, files=[path, curve])
