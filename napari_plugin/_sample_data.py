"""Sample data: a real photograph shipped inside scikit-image (no download)."""

from __future__ import annotations

from typing import Any

SAMPLE_PROVENANCE = (
    "scikit-image's data.coffee(): 'Coffee cup', photograph courtesy of Pikolo Espresso Bar, "
    "by Rachel Michetti; no copyright restrictions, CC0 (as stated in scikit-image's documentation)."
)


def coffee_sample() -> list[tuple[Any, dict[str, Any], str]]:
    """The coffee-cup photograph as an RGB image layer: ``[(data (400, 600, 3) uint8, kwargs, "image")]``."""
    try:
        from skimage import data
    except ImportError as err:  # napari shows the message in a notification
        raise ImportError("the RWKV-SAM sample needs scikit-image: pip install scikit-image") from err
    return [
        (data.coffee(), {"name": "coffee", "rgb": True, "metadata": {"source": SAMPLE_PROVENANCE}}, "image")
    ]
