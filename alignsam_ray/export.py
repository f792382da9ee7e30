"""Export a trained agent to a Ray-free bundle (`alignsam export`).

    alignsam export --checkpoint runs/synthetic_saliency --out bundles/saliency

BUNDLE/
    policy.onnx     ``agent.policy.PolicyNet`` through the torch.onnx dynamo exporter (opset 18): (obs (B, E, R, R) float32,
                    action_mask (B, N) float32) -> masked logits (B, N); B is dynamic. What segment runs
                    (onnxruntime: a data format, no code is loaded)
    policy.pt2      only with ``--pt2``: the same graph as a torch.export program (``torch.export.load``
                    unpickles it: use it only for bundles from a trusted source; segment never loads it)
    srm.pt          the SRM ({"branch", "embed_dim", "state_dict"}, tensors only: ``weights_only`` loads it)
    config.yaml     the run config (grid, T, R, ...)
    manifest.json   format version, SAM model id (type + checkpoint sha256 of the store it was trained
                    on), shapes, files with sha256, the source checkpoint

The bundle holds no SAM weights: ``alignsam segment`` loads the micro-SAM shipped in the package or
the official checkpoint the user passes, and checks its sha256 against the manifest.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import yaml

from .agent.policy import PolicyNet
from .agent.srm import save_srm
from .checksum import file_sha256

BUNDLE_FORMAT = 1
POLICY_PT2, POLICY_ONNX, SRM_FILE, CONFIG_FILE, MANIFEST = "policy.pt2", "policy.onnx", "srm.pt", "config.yaml", "manifest.json"
def export_bundle(checkpoint: str, out: str, pt2: bool = False) -> dict:
    """Write the bundle of a training checkpoint (a run folder or ``checkpoints/iter_N``); ``pt2``: also
    the torch.export program."""
    from .checkpoint import Agent
    from .store.shards import read_manifest

    agent = Agent.load(checkpoint)
    policy = PolicyNet.from_module(agent.module)
    e = agent.cfg.env
    R, N, E = int(e.obs_res), agent.grid.n, agent.srm.embed_dim
    example = (torch.randn(2, E, R, R), torch.ones(2, N))
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {"obs": {0: batch}, "action_mask": {0: batch}}
    onnx_program = torch.onnx.export(policy, example, dynamo=True, dynamic_shapes=shapes,
                                     input_names=["obs", "action_mask"], output_names=["logits"])
    onnx_program.save(os.path.join(tmp, POLICY_ONNX))
    files = [POLICY_ONNX]
    if pt2:
        torch.export.save(torch.export.export(policy, example, dynamic_shapes=shapes), os.path.join(tmp, POLICY_PT2))
        files.append(POLICY_PT2)
    save_srm(agent.srm, os.path.join(tmp, SRM_FILE))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        yaml.safe_dump(agent.cfg.to_dict(), f, sort_keys=False)
    files += [SRM_FILE, CONFIG_FILE]
    try:
        store = read_manifest(agent.cfg.store)
        sam = {"sam_type": store["sam_type"], "checkpoint_sha256": store["checkpoint_sha256"],
               "embed_dim": store["embed_dim"], "maps": store.get("maps", [])}
        clip = store.get("clip")  # model, weights sha256, map name -> text: what segment must recompute
    except Exception as exc:  # the store may live elsewhere by now; the checkpoint still says what it needs
        raise FileNotFoundError(f"cannot read the training store {agent.cfg.store!r} to record which SAM the "
                                f"policy was trained on ({exc}); pass a checkpoint whose store is reachable") from exc
    manifest = {
        "format_version": BUNDLE_FORMAT, "task": agent.cfg.task, "sam": sam, "clip": clip,
        "grid": [agent.grid.rows, agent.grid.cols], "obs_res": R, "horizon": int(e.horizon),
        "policy_inputs": {"obs": ["B", E, R, R], "action_mask": ["B", N]}, "policy_output": ["B", N],
        "srm_branch": agent.srm.branch, "text_map": agent.cfg.srm.text_map,
        "source_checkpoint": agent.checkpoint,
        "files": {name: file_sha256(os.path.join(tmp, name)) for name in files},
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return manifest
