"""alignsam_ray: AlignSAM on Ray RLlib (a PPO agent learns where to click so a frozen SAM segments a new task)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alignsam_ray")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
