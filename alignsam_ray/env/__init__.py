"""The AlignSAM environment: patch grid, batched episode logic, Gymnasium envs."""
from .alignsam_env import AlignSamEnv, AlignSamVectorEnv, iter_prompt_episodes, make_env
from .episodes import PromptEpisodes
from .grid import PatchGrid

__all__ = ["AlignSamEnv", "AlignSamVectorEnv", "PatchGrid", "PromptEpisodes", "iter_prompt_episodes", "make_env"]
