"""Train and score the embedded micro-SAM (``alignsam_ray/weights/micro_sam.pt``).

    python -m tools.micro_sam.train            # the defaults reproduce the shipped weights' recipe
    python -m tools.micro_sam.evaluate --out micro_sam_eval.json
    python -m tools.micro_sam.padding_check --out padding.json
    python -m tools.micro_sam.oracle_points STORE [STORE ...]

Training-only helpers live here too: ``object_mix`` (the synthetic training / held-out scenes),
``sampled_decode`` (the decoder on sampled cells) and ``fused_ops`` (a fused LayerNorm2d).
"""
