"""``python -m training.data_sources {manifest,pack,protocol}``: fetch sources, write manifest / pack."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .fetch import default_cache_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m training.data_sources", description=__doc__)
    ap.add_argument(
        "--cache", type=Path, default=None, help=f"download cache (default {default_cache_dir()})"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifest", help="fetch every source and write the provenance/licence manifest")
    m.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("pack", help="write the compact source pack the synthetic generator reads")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-side", type=int, default=1280)
    p.add_argument("--protocol-seed", type=int, default=0)
    q = sub.add_parser(
        "protocol", help="the 20-nuclei fine-tuning split: print it as JSON, optionally write it"
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--train-out", type=Path, default=None, help="write the 20 nuclei as an instance-folder dataset"
    )
    q.add_argument(
        "--eval-out", type=Path, default=None, help="write the evaluation nuclei as a held-out pack (.npz)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "manifest":
            from .manifest import build_manifest, check_manifest, write_manifest

            man = build_manifest(args.cache)
            problems = check_manifest(man)
            write_manifest(args.out, man)
            for pr in problems:
                logging.error("manifest: %s", pr)
            print(f"{len(man['files'])} files -> {args.out}")
            return 1 if problems else 0
        if args.cmd == "pack":
            from .pack import build_pack

            out = build_pack(args.out, args.cache, max_side=args.max_side, protocol_seed=args.protocol_seed)
            print(out)
            return 0
        from .loaders import nuclei_protocol, protocol_to_json

        proto = nuclei_protocol(args.cache, seed=args.seed)
        if args.train_out is not None:
            from rwkvsam_core.data import write_instance_sample

            write_instance_sample(
                args.train_out,
                f"nuclei20_train_seed{args.seed}",
                proto.image,
                proto.train_masks,
                ["nucleus"] * len(proto.train_masks),
            )
            (args.train_out / "protocol.json").write_text(protocol_to_json(proto))
        if args.eval_out is not None:
            from training.heldout import HeldoutImage, save_heldout_pack

            item = HeldoutImage(
                f"nuclei20_eval_seed{args.seed}",
                proto.image,
                proto.eval_masks,
                "microscopy",
                ["nucleus"] * len(proto.eval_masks),
                dict(proto.provenance, eval_ids=proto.eval_ids),
            )
            save_heldout_pack([item], args.eval_out)
        print(protocol_to_json(proto))
        return 0
    except Exception as exc:  # one error line for subprocess callers
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
