"""Every hyper-parameter of the PPO controller, with the paper's value as default where it gives one."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from windquant.alloc.ppo.rewards import RewardConfig
from windquant.errors import WindquantError, reject_unknown_fields


@dataclass
class PPOConfig:
    episodes: int = 100  # paper §4.1 (1B-8B runs)
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
    checkpoint_every: int = 5  # episodes between resumable checkpoints
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> PPOConfig:
        if self.episodes < 0:
            raise WindquantError(f"--episodes must be >= 0, got {self.episodes}")
        if not self.curriculum:
            raise WindquantError("the PPO curriculum needs at least one target")
        if self.checkpoint_every < 1:
            raise WindquantError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["curriculum"] = list(self.curriculum)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PPOConfig:
        reject_unknown_fields(cls, d, "PPO config")
        d = dict(d)
        if "reward" in d:
            d["reward"] = RewardConfig(**d["reward"])
        if "curriculum" in d:
            d["curriculum"] = tuple(d["curriculum"])
        return cls(**d)


def curriculum_target(episode: int, episodes: int, stages: tuple[float, ...], final: float) -> float:
    """Target of ``episode``: the stages spread evenly over the run, the last one = ``final``.

    Stages below the user's target are raised to it, so a 3-bit run never trains at 2 bits.
    """
    targets = [max(s, final) for s in stages[:-1]] + [final]
    stage = min(len(targets) - 1, episode * len(targets) // max(episodes, 1))
    return targets[stage]
