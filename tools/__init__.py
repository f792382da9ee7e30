"""Research tooling, not part of the installed ``alignsam_ray`` package: training and scoring the
small embedded demo models. Run from the repository root as modules, e.g.
``python -m tools.micro_sam.train`` or ``python -m tools.micro_clip.train``."""
