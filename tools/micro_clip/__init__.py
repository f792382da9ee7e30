"""Train and score the embedded micro CLIP (``alignsam_ray/weights/micro_clip.pt``).

    python -m tools.micro_clip.train           # the defaults reproduce the shipped weights
    python -m tools.micro_clip.eval_maps --out results/clip_maps.json
"""
