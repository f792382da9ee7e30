"""RLlib callbacks: the episode metrics of a training run (the SRM itself is ``algorithm.AlignSamPPO``'s)."""
from __future__ import annotations

import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback


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
