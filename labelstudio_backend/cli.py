"""``rwkvsam-labelstudio``: serve the ML backend, pre-annotate or pre-compute a whole project.

    rwkvsam-labelstudio serve --port 9090 [--workers 2 --threads 4]
    rwkvsam-labelstudio preannotate --project 3         # masks for every box, as LS predictions
    rwkvsam-labelstudio precompute --project 3          # fill the embedding cache
    torchrun --nproc-per-node 4 -m labelstudio_backend.cli preannotate --project 3   # sharded

Configuration comes from the environment (see :class:`labelstudio_backend.settings.Settings`);
flags override it. ``serve`` runs gunicorn with threaded workers (``gthread``): the app is loaded in
each worker after the fork (no ``--preload``), and the model on the first prediction.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .settings import Settings

logger = logging.getLogger("labelstudio_backend")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="model_name", help="model name (RWKVSAM_MODEL, default rwkvsam_t)")
    p.add_argument("--checkpoint", help="weights file (RWKVSAM_CHECKPOINT)")
    p.add_argument("--image-size", type=int, help="model input side (RWKVSAM_IMAGE_SIZE)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (RWKVSAM_DEVICE)")
    p.add_argument("--model-dir", help="state folder (MODEL_DIR)")
    p.add_argument("--label-studio-url", help="Label Studio base URL (LABEL_STUDIO_URL)")
    p.add_argument("--api-key", help="Label Studio token (LABEL_STUDIO_API_KEY)")
    p.add_argument("--log-level", help="LOG_LEVEL (default INFO)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvsam-labelstudio", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the ML backend server (gunicorn, threaded workers)")
    _common(s)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=9090)
    s.add_argument("--workers", type=int, help="worker processes (WORKERS, default 1)")
    s.add_argument("--threads", type=int, help="threads per worker (THREADS, default 4)")
    s.add_argument("--timeout", type=int, default=300, help="worker timeout in seconds (default 300)")
    s.add_argument("--basic-auth-user")
    s.add_argument("--basic-auth-pass")
    s.add_argument("--dev", action="store_true", help="Flask's single-process development server instead")

    for name, text in (
        ("preannotate", "masks for every box of a project, imported as predictions"),
        ("precompute", "compute and cache the embedding of every image of a project"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--project", type=int, required=True, help="Label Studio project id")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "preannotate":
            p.add_argument("--batch", type=int, default=16, help="predictions per import call (default 16)")
            p.add_argument("--no-resume", action="store_true", help="ignore the progress of earlier runs")
            p.add_argument(
                "--overwrite",
                action="store_true",
                help="redo tasks that already hold a prediction of the current model version",
            )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    keys = (
        "model_name",
        "checkpoint",
        "image_size",
        "device",
        "model_dir",
        "label_studio_url",
        "api_key",
        "log_level",
        "workers",
        "threads",
        "basic_auth_user",
        "basic_auth_pass",
    )
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in keys}
    if overrides.get("model_dir"):
        from pathlib import Path

        overrides["model_dir"] = Path(overrides["model_dir"])
    if overrides.get("label_studio_url"):
        overrides["label_studio_url"] = overrides["label_studio_url"].rstrip("/")
    return Settings.from_env(**overrides)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )


def warm_imports() -> None:
    """Import torch and the core before serving (seconds on a busy CPU; Label Studio gives /setup 3 s).

    Importing torch does not initialise CUDA, so this is safe in a freshly forked worker.
    """
    import rwkvsam_core  # noqa: F401


def serve(settings: Settings, host: str, port: int, timeout: int = 300, dev: bool = False) -> int:
    """Run the server until interrupted."""
    from .server import create_app

    if dev:
        warm_imports()
        create_app(settings).run(host=host, port=port, threaded=True)
        return 0
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):
        def load_config(self) -> None:
            cfg = {
                "bind": f"{host}:{port}",
                "workers": settings.workers,
                "threads": settings.threads,
                "worker_class": "gthread",
                "timeout": timeout,
                "preload_app": False,  # CUDA must not be initialised before the fork
                "loglevel": settings.log_level.lower(),
                "accesslog": "-" if settings.log_level.upper() == "DEBUG" else None,
            }
            for k, v in cfg.items():
                self.cfg.set(k, v)

        def load(self):  # called in each worker after the fork, before it accepts requests
            configure_logging(settings.log_level)
            warm_imports()
            return create_app(settings)

    logger.info(
        "serving on %s:%d with %d worker(s) x %d thread(s), MODEL_DIR=%s",
        host,
        port,
        settings.workers,
        settings.threads,
        settings.model_dir,
    )
    _App().run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (ValueError, TypeError) as exc:
        print(f"rwkvsam-labelstudio: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        if args.command == "serve":
            return serve(settings, args.host, args.port, args.timeout, args.dev)
        from .offline import LabelStudioAPIError, preannotate, precompute

        try:
            if args.command == "preannotate":
                counts = preannotate(
                    settings,
                    args.project,
                    batch=args.batch,
                    resume=not args.no_resume,
                    overwrite=args.overwrite,
                    show_progress=not args.no_progress,
                )
            else:
                counts = precompute(settings, args.project, show_progress=not args.no_progress)
        except LabelStudioAPIError as exc:
            print(f"rwkvsam-labelstudio: error: {exc}", file=sys.stderr)
            return 1
        print(" ".join(f"{k}={v}" for k, v in counts.items()))
        return 0 if not counts.get("failed") else 1
    except KeyboardInterrupt:
        return 130


def register(subparsers: Any) -> None:
    """Entry point of the ``rwkvsam.commands`` group: ``rwkvsam labelstudio serve|preannotate|precompute``."""
    p = subparsers.add_parser(
        "labelstudio", help="Label Studio ML backend (same as rwkvsam-labelstudio)", add_help=False
    )
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: main(a.args or ["--help"]))


if __name__ == "__main__":
    sys.exit(main())
