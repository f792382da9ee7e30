"""Paper Table 3 from per-class VOC evaluations: per-class IoU (accumulated over the class's images) and the
mean over the 20 classes, for alignsam and every ablation.

    python scripts/voc_table.py eval/voc_*/metrics.json [--out voc_table.md]

Each metrics.json is `alignsam evaluate` of one class's run on a store embedded with `--classes CLASS`.
"""
from __future__ import annotations

import argparse
import json
import sys

from alignsam_ray.evaluate import voc_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+", help="metrics.json files, one per VOC class")
    ap.add_argument("--out", help="also write the table (Markdown) and a JSON beside it")
    args = ap.parse_args(argv)
    evaluations = []
    for path in args.metrics:
        try:
            with open(path) as f:
                evaluations.append(json.load(f))
        except (OSError, ValueError) as exc:
            print(f"voc_table: cannot read {path}: {exc}", file=sys.stderr)
            return 1
    try:
        text, data = voc_table(evaluations)
    except ValueError as exc:
        print(f"voc_table: {exc}", file=sys.stderr)
        return 1
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(data, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
