"""Every setting of the PPO controller, with the paper's value as default where it gives one.

Fields with help text are CLI flags; the others are set with ``--ppo-set KEY=VALUE,...``.
"""

from __future__ import annotations

from dataclasses import dataclass

from windquant.alloc.ppo.rewards import RewardConfig
from windquant.config import require, setting

MODES = ("construct", "refine")
STATES = ("paper", "sensitivity")
SHAPINGS = ("none", "potential")
ORDERS = ("model", "sensitive")
REFINE_MOVES = ("group", "unit")
REFINE_PROXIES = ("stored", "candidates")
PROXY_WINDOWS = ("heldout", "calibration")


# Flags: --ppo-<setting>; the unprefixed spellings of the first releases stay accepted.
@dataclass
class PPOConfig:
    mode: str = setting(
        "refine",
        "construct: the paper's MDP, one decision per unit; refine: budget-neutral moves from ilp's plan, rewarded by the change in real proxy loss",
        flag="--ppo-mode",
        choices=MODES,
    )
    episodes: int = setting(
        100, "training episodes (the paper's value)", flag=("--ppo-episodes", "--episodes")
    )  # paper §4.1 (1B-8B runs)
    # The proxy: calibration windows scored per episode. The paper uses 64 x 256; 8 keeps an
    # episode at ~10 s on one CPU core (use 64 on a GPU).
    proxy_samples: int = setting(
        8, "calibration windows scored per episode (paper 64)", flag=("--ppo-proxy-samples", "--proxy-samples")
    )
    proxy_len: int = setting(256, "tokens per proxy window", flag=("--ppo-proxy-len", "--proxy-len"))
    # heldout: windows of the calibration corpus that overlap no calibration window, so the reward
    # is out of sample for everything fitted there (candidates, carried errors); calibration: the
    # first calibration windows (the paper's proxy is a calibration subset).
    proxy_windows: str = "heldout"
    work_dir: str | None = setting(
        None, "checkpoints + episode log", flag="--ppo-dir", shown="under the candidate cache", run=True
    )
    resume: bool = setting(
        False, "continue a killed PPO run from its last checkpoint", flag=("--ppo-resume", "--resume"), run=True
    )
    policy: str | None = setting(
        None,
        "reuse a trained policy.safetensors zero-shot (no training)",
        flag=("--ppo-policy", "--policy"),
        shown="train one",
        metavar="PATH",
    )
    curriculum: tuple[float, ...] = (3.0, 2.5, 2.0, 2.0)  # paper §3.3; last stage = the user's target
    lr: float = 5e-4  # Adam learning rate (paper §4.1)
    gamma: float = 0.99  # discount (paper §3.2.3)
    gae_lambda: float = 0.95  # GAE λ (paper §3.4)
    clip: float = 0.2  # PPO clipping ε (paper §4.1)
    epochs: int = 3  # optimisation epochs per roll-out (paper §3.4)
    value_coef: float = 0.5  # c1 (paper §3.4)
    entropy_coef: float = 0.05  # c2 (paper §3.4)
    minibatches: int = 4  # per epoch (CleanRL default; the paper does not say)
    max_grad_norm: float = 0.5  # gradient clipping (CleanRL default; not in the paper)
    hidden: int = 64  # width of the 2-layer LayerNorm+ReLU body (paper gives no width)
    # Minimum-precision clamps (paper §3.2.2 names them, not their values). Chosen from the
    # ilp allocator's plans on SmolLM2 at 2.5 true bits: it never put the first blocks below
    # 1.58 bit, kept attention v/k high, and gave 1 bit to only 3.8 % of the weights; a PPO run
    # with a 1-bit MLP floor spent its budget early and ended with ~60 % of the weights at 1 bit
    # (proxy PPL ~900 vs 243 for the heuristic; benchmarks/results/rl_vs_heuristic/ablation).
    # When a target is below what the floors allow they are relaxed (MLP, attention, early).
    early_layers: int = 2  # blocks counted as "early"
    min_bits_early: float = 2.0
    min_bits_attention: float = 1.58
    min_bits_mlp: float = 1.58
    # Options of the construct mode (the paper's values are the defaults; see PRESETS).
    state: str = "paper"  # paper: Table 1's 15 features; sensitivity: + each action's normalised ilp cost and bits
    shaping: str = "none"  # none | potential: Φ = -shaping_scale × additive predicted loss of the decisions so far
    shaping_scale: float = 1.0  # reward units per nat of predicted loss
    order: str = "model"  # model: units in model order (paper); sensitive: most sensitive units first
    # Options of the refine mode: each episode is one budget-neutral change to the incumbent plan
    # (ilp's at the start), proposed by the policy and scored by the real proxy.
    refine_moves: str = (
        "group"  # group: re-weight one projection-in-a-block's ilp costs and re-solve; unit: set one unit, repair greedily
    )
    refine_step: float = 0.5  # group moves: change of a group's log cost weight per move
    refine_max_weight: float = 3.0  # group moves: |log cost weight| stays within this
    refine_batch: int = 8  # one-step episodes per PPO update (several roll-outs per update)
    refine_prior: float = 8.0  # prior logit = -refine_prior × rank of the move's additive predicted cost, in [0, 1]
    refine_min_gain: float = 0.0  # a move is accepted when it lowers the proxy's mean NLL by more than this (nats)
    refine_entropy_coef: float = 0.001  # c2 over the ~N×7 moves (the paper's 0.05 is for 7 actions)
    refine_baseline_decay: float = 0.9  # reward baseline: exponential moving average of the rewards
    # What the refine proxy scores: "stored", the weights windquant stores (errors carried across a
    # linear's chunks when the fit carries: the linears a move changes are re-carried), or
    # "candidates", the cache's candidates (faster; what the construct mode always scores).
    refine_proxy: str = "stored"
    # Validation: the refined plan is returned only if it also beats ilp's on this many other
    # held-out windows (disjoint from the proxy's); otherwise ilp's plan is. Moves accepted on a
    # small proxy partly fit its noise; this keeps that from making the result worse than ilp's.
    refine_validate: int = 16  # windows; 0: no check
    checkpoint_every: int = setting(5, run=True)  # episodes between resumable checkpoints
    reward: RewardConfig = setting(factory=RewardConfig)

    def validate(self) -> PPOConfig:
        checks = (
            ("episodes", self.episodes >= 0, ">= 0"),
            ("proxy_samples", self.proxy_samples >= 1, ">= 1"),
            ("proxy_len", self.proxy_len >= 2, ">= 2"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("curriculum", len(self.curriculum) >= 1, "at least one target"),
            ("mode", self.mode in MODES, " | ".join(MODES)),
            ("state", self.state in STATES, " | ".join(STATES)),
            ("shaping", self.shaping in SHAPINGS, " | ".join(SHAPINGS)),
            ("order", self.order in ORDERS, " | ".join(ORDERS)),
            ("refine_batch", self.refine_batch >= 1, ">= 1"),
            ("refine_validate", self.refine_validate >= 0, ">= 0"),
            ("refine_moves", self.refine_moves in REFINE_MOVES, " | ".join(REFINE_MOVES)),
            ("refine_proxy", self.refine_proxy in REFINE_PROXIES, " | ".join(REFINE_PROXIES)),
            ("proxy_windows", self.proxy_windows in PROXY_WINDOWS, " | ".join(PROXY_WINDOWS)),
        )
        require(self, checks, "PPO ")
        return self


# Named settings (``--ppo-set`` keys): "paper" is the paper's controller as published (§3.2-3.4);
# "guided" adds the sensitivity state, potential shaping and the sensitive-first order to it;
# "refine" is the refinement mode.
PRESETS: dict[str, dict] = {
    "paper": {"mode": "construct", "state": "paper", "shaping": "none", "order": "model", "proxy_windows": "calibration"},
    "guided": {
        "mode": "construct",
        "state": "sensitivity",
        "shaping": "potential",
        "order": "sensitive",
        "proxy_windows": "calibration",
    },
    "refine": {"mode": "refine"},
}


def curriculum_target(episode: int, episodes: int, stages: tuple[float, ...], final: float) -> float:
    """Target of ``episode``: the stages spread evenly over the run, the last one = ``final``.

    Stages below the user's target are raised to it, so a 3-bit run never trains at 2 bits.
    """
    targets = [max(s, final) for s in stages[:-1]] + [final]
    stage = min(len(targets) - 1, episode * len(targets) // max(episodes, 1))
    return targets[stage]
