"""The AlignSAM environment: patch grid, batched episode logic, Gymnasium envs.

Names are imported on first use, so ``alignsam_ray.env.episodes`` / ``.grid`` load without Ray
(``alignsam segment`` runs Ray-free); the Gymnasium envs (``alignsam_env``) read Ray's object store.
"""
import importlib

_WHERE = {"AlignSamEnv": "alignsam_env", "AlignSamVectorEnv": "alignsam_env", "iter_prompt_episodes": "alignsam_env",
          "make_env": "alignsam_env", "PromptEpisodes": "episodes", "PatchGrid": "grid"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
