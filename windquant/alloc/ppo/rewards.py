"""Reward terms of the WINDQuant controller (paper §3.3, Eq. 4-5), each a small pure function.

Episode end: ``R = α·G_c − P_qual − P_budget − P_ppl − P_skip + B_quality``. The paper fixes
ε = 0.3, the perplexity-ratio thresholds 3 (soft) and 20 (hard), the 10 % skip allowance
and the bonus below ratio 2; it does not publish the weights, so the ones below are ours
(chosen so that the quality terms, which differ between plans, dominate the compression
gain, which is nearly constant for plans at the budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class RewardConfig:
    alpha: float = 1.0  # weight of the compression gain G_c
    epsilon: float = 0.3  # tolerated relative loss increase (paper ε)
    ppl_soft: float = 3.0  # perplexity ratio where P_ppl starts (paper)
    ppl_hard: float = 20.0  # ratio where P_ppl turns logarithmic and steep (paper)
    ppl_soft_weight: float = 1.0  # P_ppl reaches this at the hard threshold
    ppl_hard_weight: float = 2.0  # P_ppl slope per unit of ln(ratio / hard) beyond it
    skip_allowance: float = 0.10  # share of skipped (fp16) units tolerated (paper)
    skip_weight: float = 2.0
    bonus_ratio: float = 2.0  # B_quality is paid below this perplexity ratio (paper)
    bonus: float = 1.0
    budget_weight: float = 10.0  # super-linear penalty on relative budget excess
    step_skip_penalty: float = 0.02  # per-step: a skip costs this much
    step_saved_coef: float = 0.01  # per-step: × relative bits saved at or below target
    step_over_coef: float = 0.01  # per-step: × relative bits above target (mild)
    lambda_init: float = 1.0  # initial Lagrange multiplier of the quality constraint
    lambda_lr: float = 0.5  # projected gradient-ascent step on λ
    lambda_max: float = 10.0  # projection interval [0, lambda_max]


def compression_gain(bits_used: float, fp32_bits: float, floor_bits: float) -> float:
    """``G_c``: bit reduction vs an FP32 reference, capped at the best reachable one.

    ``floor_bits`` is the cheapest plan allowed (all units at their lowest action, INT8
    salient weights and scales included), so the cap accounts for protection overhead.
    """
    return min(1.0 - bits_used / fp32_bits, 1.0 - floor_bits / fp32_bits)


def relative_loss_increase(loss_quant: float, loss_ref: float) -> float:
    return (loss_quant - loss_ref) / loss_ref


def quality_penalty(rel_increase: float, epsilon: float, lam: float) -> float:
    """``P_qual = λ · (ΔL/L − ε)_+``."""
    return lam * max(0.0, rel_increase - epsilon)


def budget_penalty(avg_bits: float, target_bits: float, weight: float) -> float:
    """Super-linear in the relative excess ``v``: ``weight · (v + v²)``."""
    v = max(0.0, avg_bits - target_bits) / target_bits
    return weight * (v + v * v)


def ppl_penalty(ratio: float, soft: float, hard: float, soft_weight: float, hard_weight: float) -> float:
    """Piecewise: 0 up to ``soft``, linear to ``soft_weight`` at ``hard``, then logarithmic.

    The logarithm keeps the penalty finite and still ordered for collapsed plans (ratios of
    100-10,000 are common at 2 bits), so PPO can tell a bad plan from a worse one.
    """
    if ratio <= soft:
        return 0.0
    if ratio <= hard:
        return soft_weight * (ratio - soft) / (hard - soft)
    return soft_weight + hard_weight * math.log(ratio / hard)


def skip_penalty(skip_fraction: float, allowance: float, weight: float) -> float:
    return weight * max(0.0, skip_fraction - allowance)


def quality_bonus(ratio: float, threshold: float, bonus: float) -> float:
    return bonus if ratio < threshold else 0.0


def final_reward(
    cfg: RewardConfig,
    lam: float,
    bits_used: float,
    fp32_bits: float,
    floor_bits: float,
    avg_bits: float,
    target_bits: float,
    ppl_quant: float,
    ppl_ref: float,
    skip_fraction: float,
) -> dict[str, float]:
    """Every term of Eq. 5 and their total (``"reward"``)."""
    ratio = ppl_quant / ppl_ref
    rel = relative_loss_increase(math.log(ppl_quant), math.log(ppl_ref))
    terms = {
        "gain": cfg.alpha * compression_gain(bits_used, fp32_bits, floor_bits),
        "p_qual": quality_penalty(rel, cfg.epsilon, lam),
        "p_budget": budget_penalty(avg_bits, target_bits, cfg.budget_weight),
        "p_ppl": ppl_penalty(ratio, cfg.ppl_soft, cfg.ppl_hard, cfg.ppl_soft_weight, cfg.ppl_hard_weight),
        "p_skip": skip_penalty(skip_fraction, cfg.skip_allowance, cfg.skip_weight),
        "bonus": quality_bonus(ratio, cfg.bonus_ratio, cfg.bonus),
    }
    terms["reward"] = terms["gain"] - terms["p_qual"] - terms["p_budget"] - terms["p_ppl"] - terms["p_skip"] + terms["bonus"]
    terms["ppl_ratio"] = ratio
    terms["rel_loss_increase"] = rel
    return terms


def step_reward(bits_per_weight: float, target_bits: float, is_skip: bool, cfg: RewardConfig) -> float:
    """Dense shaping: skip costs a little, saving bits at/below target pays, going over costs mildly."""
    if is_skip:
        return -cfg.step_skip_penalty
    if bits_per_weight <= target_bits:
        return cfg.step_saved_coef * (target_bits - bits_per_weight) / target_bits
    return -cfg.step_over_coef * (bits_per_weight - target_bits) / target_bits


def shaped_reward(reward: float, potential: float, next_potential: float, gamma: float) -> float:
    """Potential-based shaping (Ng et al. 1999): ``r + γ·Φ(s') − Φ(s)``. With Φ = 0 at the start and
    at the end of an episode the discounted shaped return equals the unshaped one, so the optimal
    policy is unchanged while every step sees its own share of the predicted loss."""
    return reward + gamma * next_potential - potential


def update_lagrange(lam: float, rel_increase: float, epsilon: float, lr: float, lam_max: float) -> float:
    """Projected gradient ascent on λ: grows while the quality constraint is violated."""
    return min(lam_max, max(0.0, lam + lr * (rel_increase - epsilon)))
