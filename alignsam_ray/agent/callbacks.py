"""RLlib callbacks and EnvRunner helpers: episode metrics, SRM samples out, SRM weights in.

SRM weights reach the EnvRunners two ways: pushed to every live runner after each SRM update
(``set_runner_srm``), and kept in a named ``SrmHolder`` actor that every env reads when it is built
(``fetch_srm_state``), so an EnvRunner that RLlib restarts mid-run labels with the current SRM, not
a random one.
"""
from __future__ import annotations

import numpy as np
import ray
from ray.rllib.callbacks.callbacks import RLlibCallback

from ..env.alignsam_env import iter_prompt_episodes
from .srm import set_srm_state


class AlignSamMetrics(RLlibCallback):
    """Per finished episode: final IoU, hit rate (share of picked points on foreground) and the
    share of points the SRM labelled correctly. Reported under result["env_runners"]."""

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs):
        infos = episode.get_infos()
        steps = [i for i in infos if "hit" in i]
        if not steps or metrics_logger is None:
            return
        hits = np.array([i["hit"] for i in steps], float)
        labels = np.array([i["label"] for i in steps], float)
        metrics_logger.log_value("final_iou", float(steps[-1]["iou"]), window=100)
        metrics_logger.log_value("hit_rate", float(hits.mean()), window=100)
        metrics_logger.log_value("label_accuracy", float((labels == hits).mean()), window=100)


def pop_srm_samples(env_runner) -> list:
    """On an EnvRunner: the (state, text state, target) samples its envs collected since last call."""
    return [s for ep in iter_prompt_episodes(env_runner.env) for s in ep.pop_srm_samples()]


def set_runner_srm(env_runner, state: dict) -> int:
    """On an EnvRunner: load SRM weights into every env; returns how many envs got them."""
    eps = iter_prompt_episodes(env_runner.env)
    for ep in eps:
        set_srm_state(ep.srm, state)
    return len(eps)


@ray.remote(num_cpus=0)
class SrmHolder:
    """The run's latest SRM weights (numpy arrays), by name."""

    def __init__(self):
        self._state = None

    def set(self, state: dict) -> None:
        self._state = state

    def get(self) -> dict | None:
        return self._state


def srm_holder(name: str):
    """Driver side: the named holder (created if missing; the caller keeps the handle alive)."""
    return SrmHolder.options(name=name, get_if_exists=True).remote()


def fetch_srm_state(name: str) -> dict | None:
    """Worker side: the latest SRM state of the run, or None before the first push."""
    try:
        holder = ray.get_actor(name)
    except ValueError:
        return None
    return ray.get(holder.get.remote())
