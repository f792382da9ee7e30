"""Paired comparison of two trained runs on the same test images (alignsam, the paper's protocol).

    python scripts/compare_runs.py --a RUN_A --b RUN_B [--store STORE] [--name-a A --name-b B] --out FILE.json

Each run (a run folder or a checkpoint) is evaluated with the paper's protocol (SRM start, greedy
policy, SRM labels, its T) on the test split of --store (default: run A's store); prints, per metric,
both values with their 95% bootstrap intervals and the paired difference A - B with its 95% interval
over the same images (a difference is reported as one only where that interval excludes 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from alignsam_ray.checkpoint import Agent
from alignsam_ray.evaluate import alignsam_score, check_store, verdict
from alignsam_ray.metrics import NAMES, SUMMARY_KEYS, confidence_intervals, paired_difference
from alignsam_ray.store.loader import EmbeddingStore


def evaluate_alignsam(agent: Agent, st: EmbeddingStore, store: str, seed: int = 0):
    check_store(agent, st, store)
    return alignsam_score(agent, st.arrays("test"), st.gt_full("test"), st.decoder(), seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="run folder or checkpoint A")
    ap.add_argument("--b", required=True, help="run folder or checkpoint B")
    ap.add_argument("--name-a", default="A")
    ap.add_argument("--name-b", default="B")
    ap.add_argument("--store", help="store whose test split both are evaluated on (default: A's store)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    agents = [Agent.load(args.a), Agent.load(args.b)]
    store = args.store or agents[0].cfg.store
    st = EmbeddingStore(store)
    accs = [evaluate_alignsam(agent, st, store) for agent in agents]
    summaries = [acc.summary() for acc in accs]
    cis = [confidence_intervals(acc) for acc in accs]
    paired = paired_difference(accs[0], accs[1])
    lines = [f"{summaries[0]['n_images']} test images of {store}; A = {args.name_a} ({agents[0].checkpoint}), "
             f"B = {args.name_b} ({agents[1].checkpoint})", "",
             f"| metric | {args.name_a} [95% CI] | {args.name_b} [95% CI] | A - B [95% CI] | |", "|---|---|---|---|---|"]
    for k in SUMMARY_KEYS:
        cells = [f"{s[k]:.3f} [{c[k][0]:.3f}, {c[k][1]:.3f}]" for s, c in zip(summaries, cis)]
        d = paired[k]
        lines.append(f"| {NAMES[k]} | {cells[0]} | {cells[1]} | {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, "
                     f"{d['ci95'][1]:+.3f}] | {verdict(d, k).replace('alignsam', args.name_a)} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python scripts/compare_runs.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "a": {"name": args.name_a, "checkpoint": agents[0].checkpoint, **summaries[0], "ci95": cis[0]},
                   "b": {"name": args.name_b, "checkpoint": agents[1].checkpoint, **summaries[1], "ci95": cis[1]},
                   "paired_a_minus_b": paired, "store": store, "table_md": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
