"""``python -m training.synth``: generate a synthetic instance-folder dataset from a source pack."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (one error line on failure)."""
    ap = argparse.ArgumentParser(prog="python -m training.synth", description=__doc__)
    ap.add_argument(
        "--pack", type=Path, required=True, help="source pack (python -m training.data_sources pack)"
    )
    ap.add_argument("--out", type=Path, required=True, help="output instance-folder dataset")
    ap.add_argument("--n", type=int, required=True, help="number of samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=1024, help="long side of the images")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--micro-fraction", type=float, default=None)
    ap.add_argument("--real-fraction", type=float, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from .dataset import generate_dataset
        from .generator import SourcePool, SynthConfig

        cfg = SynthConfig(size=args.size)
        if args.micro_fraction is not None:
            cfg.micro_fraction = args.micro_fraction
        if args.real_fraction is not None:
            cfg.real_fraction = args.real_fraction
        t0 = time.perf_counter()
        pool = SourcePool.from_pack(args.pack, max_side=max(args.size, 512))
        counts = generate_dataset(pool, args.out, args.n, seed=args.seed, cfg=cfg, workers=args.workers)
        print(f"{counts} in {time.perf_counter() - t0:.1f}s -> {args.out}")
        return 0
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
