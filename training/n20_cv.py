"""Choose fine-tuning settings for the 20-nuclei protocol without looking at its evaluation nuclei.

The protocol (issue 7) fine-tunes on 20 annotated nuclei of one image and evaluates on the image's
other nuclei. Picking the settings by their score on those evaluation nuclei would tune on the test
set. This module does K-fold cross-validation inside the 20 training nuclei instead: each fold
fine-tunes on the other folds' nuclei and is scored on its own, so every training nucleus is scored
once, by a model that never saw it.

    python -m training.n20_cv folds --data generated_data/nuclei20_train --out runs/n20cv --k 4
    # per config and fold: python -m rwkvsam_core.finetune --data runs/n20cv/fold0/train ...
    #                      python benchmarks/eval_starter.py --heldout-pack runs/n20cv/fold0/val.npz ...
    python -m training.n20_cv summary runs/n20cv/results        # results/<config>/fold<k>.json

``summary`` pools the per-object IoUs of all folds per config (the mean over the 20 nuclei, raw and
clipped to the box) and prints them as a markdown table, best first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _load_sample(folder: Path) -> tuple[str, np.ndarray, np.ndarray, list[str]]:
    """The one instance sample of an instance folder: (name, image, masks, labels)."""
    from rwkvsam_core.data import InstanceFolderDataset

    ds = InstanceFolderDataset(folder)
    if len(ds) != 1:
        raise ValueError(f"{folder}: expected one image, found {len(ds)}")
    s = ds[0]
    return Path(str(s["name"])).name, np.asarray(s["image"]), np.asarray(s["masks"], bool), list(s["labels"])


def fold_indices(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """K disjoint validation index sets covering range(n), from one seeded permutation."""
    if not 2 <= k <= n:
        raise ValueError(f"need 2 <= k <= n, got k={k}, n={n}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(order[i::k]) for i in range(k)]


def make_folds(data: Path, out: Path, k: int, seed: int = 0) -> list[Path]:
    """Write ``out/fold<i>/train`` (instance folder) and ``out/fold<i>/val.npz`` (held-out pack)."""
    from rwkvsam_core.data import write_instance_sample
    from training.heldout import HeldoutImage, save_heldout_pack

    name, image, masks, labels = _load_sample(data)
    dirs = []
    for i, val in enumerate(fold_indices(len(masks), k, seed)):
        train = np.setdiff1d(np.arange(len(masks)), val)
        d = out / f"fold{i}"
        write_instance_sample(d / "train", f"{name}_cv{i}", image, masks[train], [labels[j] for j in train])
        prov = {"source": str(data), "fold": i, "k": k, "seed": seed, "val_index": val.tolist()}
        save_heldout_pack(
            [HeldoutImage(f"{name}_cv{i}", image, masks[val], "microscopy", [labels[j] for j in val], prov)],
            d / "val.npz",
        )
        dirs.append(d)
    return dirs


def summarize(results: Path) -> list[dict]:
    """Pool ``results/<config>/fold*.json`` (eval_starter outputs) per config; best raw mIoU first."""
    rows = []
    for cfg in sorted(p for p in results.iterdir() if p.is_dir()):
        raw: list[float] = []
        clipped: list[float] = []
        folds = sorted(cfg.glob("fold*.json"))
        for f in folds:
            for o in json.loads(f.read_text())["objects"]:
                (clipped if o["method"].endswith("clipped to box") else raw).append(o["iou"])
        if raw:
            rows.append(
                {
                    "config": cfg.name,
                    "folds": len(folds),
                    "objects": len(raw),
                    "mIoU": 100 * float(np.mean(raw)),
                    "mIoU_clipped": 100 * float(np.mean(clipped)) if clipped else float("nan"),
                }
            )
    return sorted(rows, key=lambda r: -r["mIoU"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.n20_cv", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("folds", help="write the K folds of an instance folder with one image")
    f.add_argument("--data", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--k", type=int, default=4)
    f.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("summary", help="pool the folds' evaluations per config")
    s.add_argument("results", type=Path)
    s.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "folds":
        for d in make_folds(args.data, args.out, args.k, args.seed):
            print(d)
        return 0
    rows = summarize(args.results)
    print("| config | folds | nuclei | mIoU raw | mIoU clipped |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['folds']} | {r['objects']} | {r['mIoU']:.1f} | {r['mIoU_clipped']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
