"""``AlignSamPPO``: RLlib's PPO (new API stack) that owns the SRM.

    AlignSamPPOConfig()...srm_training(embed_dim=..., branch=..., lr=..., q=..., batch_size=..., seed=...,
                                       bf16=...).build_algo() -> AlignSamPPO

One ``train()`` = PPO's training step (EnvRunners sample, the learner runs K epochs, the new policy
weights go to the EnvRunners), then q SRM updates on the (state, ground truth) pairs the EnvRunners
collected during it, then the new SRM weights go to every EnvRunner. The SRM's weights, optimiser and
random stream are part of the algorithm's state (``get_state`` / ``set_state``), so ``save_to_path``,
``restore_from_path`` and ``Algorithm.from_checkpoint`` carry them; an EnvRunner that RLlib restarts
gets them back in ``restore_env_runners`` (RLlib's pattern for state that is not a policy weight:
rllib/examples/algorithms/classes/appo_w_shared_data_actor.py).

Results: ``result["alignsam"]`` holds ``srm_loss``, ``srm_pixel_acc`` and ``srm_s`` (this iteration's
SRM seconds) of the last ``train()``.
"""
from __future__ import annotations

import time

from ray.rllib.algorithms.ppo import PPO, PPOConfig

from ..env.alignsam_env import pop_srm_samples, set_srm_weights
from .srm import SrmTrainer

SRM_STATE = "srm"  # the key of the SRM's state in the algorithm's state (algo/algorithm_state.pkl)
RESULTS = "alignsam"  # result[RESULTS]: the SRM update's statistics
SRM_RESULT_KEYS = ("srm_loss", "srm_pixel_acc", "srm_s")


class AlignSamPPOConfig(PPOConfig):
    """PPOConfig + the SRM's settings (``srm_training``)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or AlignSamPPO)
        self.srm_settings: dict = {}

    def srm_training(self, *, embed_dim: int, branch: str, lr: float, q: int | None, batch_size: int, seed: int,
                     bf16: bool) -> AlignSamPPOConfig:
        """The SRM trainer's arguments (``agent.srm.SrmTrainer``; values from the run config's ``srm``)."""
        self.srm_settings = {"embed_dim": embed_dim, "branch": branch, "lr": lr, "q": q, "batch_size": batch_size,
                             "seed": seed, "bf16": bf16}
        return self


class AlignSamPPO(PPO):
    """PPO whose algorithm state includes the SRM (see module docstring)."""

    srm: SrmTrainer

    @classmethod
    def get_default_config(cls) -> AlignSamPPOConfig:
        return AlignSamPPOConfig()

    def setup(self, config: AlignSamPPOConfig) -> None:
        if not config.srm_settings:
            raise ValueError("AlignSamPPOConfig needs .srm_training(...) (the SRM's settings)")
        self.srm = SrmTrainer(**config.srm_settings)  # (seeds torch before PPO builds the learner, as it always did)
        super().setup(config)
        self.send_srm()

    def send_srm(self, remote_worker_ids: list[int] | None = None) -> None:
        """The current SRM weights to the EnvRunners (all healthy ones, or ``remote_worker_ids``), waiting
        until each holds them."""
        weights = self.srm.weights()
        self.env_runner_group.foreach_env_runner(lambda runner: set_srm_weights(runner, weights),
                                                 local_env_runner=remote_worker_ids is None,
                                                 remote_worker_ids=remote_worker_ids)

    def training_step(self) -> None:
        super().training_step()  # sample, PPO update, policy weights to the EnvRunners
        t0 = time.time()
        parts = self.env_runner_group.foreach_env_runner(pop_srm_samples, local_env_runner=True)
        stats = self.srm.update([s for part in parts if part for s in part])
        self.send_srm()
        stats["srm_s"] = time.time() - t0
        for key in SRM_RESULT_KEYS:  # window 1: each result holds this iteration's own values
            self.metrics.log_value((RESULTS, key), float(stats.get(key, float("nan"))), reduce="mean", window=1)

    def restore_env_runners(self, env_runner_group) -> list[int]:
        restored = super().restore_env_runners(env_runner_group)  # RLlib re-sends the policy weights
        if restored and env_runner_group is self.env_runner_group:
            self.send_srm(remote_worker_ids=restored)  # and the SRM: a restarted runner's is a random one
        return restored

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component(SRM_STATE, components, not_components):
            state[SRM_STATE] = self.srm.get_state()
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if SRM_STATE in state:
            self.srm.set_state(state[SRM_STATE])
            self.send_srm()
