"""Label Studio ML backend for RWKV-SAM.

Serves Label Studio's ML-backend HTTP protocol (/health, /setup, /predict, /webhook, /metrics):
interactive masks from clicks and boxes, masks for every box of a task, fine-tuning on accepted
annotations, and offline pre-annotation / embedding pre-computation of whole projects.

Start it with ``rwkvsam-labelstudio serve`` (or ``python -m labelstudio_backend.cli serve``).
Importing this package has no side effects: no model is loaded until the first prediction.
"""

from .settings import Settings

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings | None = None):  # noqa: ANN201 - avoids importing Flask here
    """Build the Flask WSGI app (see :func:`labelstudio_backend.server.create_app`)."""
    from .server import create_app as _create_app

    return _create_app(settings)
