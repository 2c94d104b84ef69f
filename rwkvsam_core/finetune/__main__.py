"""``python -m rwkvsam_core.finetune --data DIR --out DIR --steps N ...``: fine-tune from the command line.

Exit code 0 on success; on failure one ``error: ...`` line on stderr and exit code 1 (2 for bad options).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def main(
    argv: list[str] | None = None,
    prog: str = "python -m rwkvsam_core.finetune",
    description: str | None = None,
    opener: Any = None,
    **run_kwargs: Any,
) -> int:
    """The command line. Front ends with their own entry (e.g. the Label Studio backend) pass their
    ``prog``, a dataset ``opener`` and :func:`run_finetune` hooks, and answer exactly like this one."""
    from .cli import add_finetune_args, finetune_from_args

    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0])
    add_finetune_args(parser)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        result = finetune_from_args(args, opener=opener, **run_kwargs)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for callers that run us as a subprocess
        logging.getLogger(__name__).debug("fine-tuning failed", exc_info=True)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    last = result.history[-1]["loss"] if result.history else float("nan")
    print(
        f"done: {result.steps} steps, last loss {last:.4f}, skipped {result.skipped}, checkpoint {result.checkpoint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
