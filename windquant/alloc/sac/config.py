"""Every setting of the RAMP-style SAC allocator (discrete-action Soft Actor-Critic, one
decision per linear layer). The RAMP abstract gives no hyper-parameters; the defaults are the
discrete-SAC ones of Christodoulou (2019) / CleanRL's ``sac_atari.py`` where they apply, and
say why where they differ.

Fields with help text are CLI flags; the others are set with ``--sac-set KEY=VALUE,...``.
"""

from __future__ import annotations

from dataclasses import dataclass

from windquant.config import require, setting

PROJECTIONS = ("costs", "policy")


@dataclass
class SACConfig:
    episodes: int = setting(60, "training episodes: one per-layer plan and one proxy pass each", flag="--sac-episodes")
    proxy_samples: int = setting(8, "calibration windows scored per episode", flag="--sac-proxy-samples")
    proxy_len: int = setting(256, "tokens per proxy window", flag="--sac-proxy-len")
    work_dir: str | None = setting(
        None, "checkpoint, replay buffer, episode log", flag="--sac-dir", shown="under the candidate cache", run=True
    )
    resume: bool = setting(False, "continue a killed SAC run from its last checkpoint", flag="--sac-resume", run=True)
    policy: str | None = setting(
        None,
        "apply a trained SAC policy.safetensors zero-shot: no training episodes",
        flag="--sac-policy",
        shown="train one",
        metavar="PATH",
    )
    # Discrete SAC.
    gamma: float = 0.99  # discount
    tau: float = 0.005  # Polyak rate of the target Q-networks
    lr_actor: float = 3e-4
    lr_critic: float = 3e-4
    lr_alpha: float = 3e-4
    batch: int = 256  # transitions per gradient step
    buffer: int = 100_000  # replay capacity (transitions)
    updates_per_step: float = 1.0  # gradient steps per environment step (done after each episode)
    random_episodes: int = 4  # first episodes act uniformly at random (buffer warm-up)
    # Target entropy = entropy_fraction x log|A|. CleanRL's Atari value is 0.89; a per-layer
    # precision is one near-deterministic choice, so the policy is allowed to sharpen further.
    entropy_fraction: float = 0.3
    # The final projection's costs. costs: ilp's sensitivity table (whole layers trimmed where it
    # predicts the least loss per bit saved); policy: -log π of each layer's actions, so the plan
    # follows the policy's own preferences and does not lean on the sensitivity table.
    projection: str = setting(
        "costs",
        "what the projection onto the budget trims by: costs (the sensitivity scores) | policy (-log π)",
        flag="--sac-projection",
        choices=PROJECTIONS,
    )
    hidden: int = 256  # width of the 2-layer bodies (actor and both critics)
    # Reward (quality first): per step -scale x (the layer's predicted loss + price x its bits
    # above target); at the end -scale x (proxy log PPL ratio of the projected plan - the
    # predicted losses already paid) and the budget terms on the raw plan. The price terms
    # telescope: an episode's return is -scale x log(PPL/ref) - budget penalties.
    reward_scale: float = 10.0
    over_penalty: float = 50.0  # per unit of relative overspend (over budget is far worse...)
    under_penalty: float = 5.0  # ...than the same relative underspend
    cliff: float = 0.05  # relative overspend beyond which the cliff penalty is paid too
    cliff_penalty: float = 10.0
    checkpoint_every: int = setting(5, run=True)  # episodes between resumable checkpoints

    def validate(self) -> SACConfig:
        checks = (
            ("episodes", self.episodes >= 0, ">= 0"),
            ("proxy_samples", self.proxy_samples >= 1, ">= 1"),
            ("proxy_len", self.proxy_len >= 2, ">= 2"),
            ("gamma", 0.0 <= self.gamma <= 1.0, "in [0, 1]"),
            ("tau", 0.0 < self.tau <= 1.0, "in (0, 1]"),
            ("batch", self.batch >= 1, ">= 1"),
            ("buffer", self.buffer >= self.batch, ">= batch"),
            ("updates_per_step", self.updates_per_step >= 0, ">= 0"),
            ("entropy_fraction", 0.0 <= self.entropy_fraction < 1.0, "in [0, 1)"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("projection", self.projection in PROJECTIONS, " | ".join(PROJECTIONS)),
        )
        require(self, checks, "SAC ")
        return self
