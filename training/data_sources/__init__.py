"""Registry-shipped training and evaluation data: fetch, provenance/licence manifest, loaders, pack.

Typical use (``python -m training.data_sources --help``)::

    python -m training.data_sources manifest --out generated_data/manifest.json
    python -m training.data_sources pack --out generated_data/source_pack

Nothing is fetched at import time.
"""

from .catalog import HELDOUT_PACKAGES, HELDOUT_ROLES, SOURCES, TRAINING_ROLES, Source, source_by_key
from .fetch import FetchError, default_cache_dir, fetch_source, read_member
from .loaders import (
    NucleiProtocol,
    Picture,
    RealObjects,
    assert_trainable,
    boxes_from_masks,
    decode_image,
    labels_to_masks,
    load_mask_shapes,
    load_pictures,
    load_real_objects,
    normalize_to_uint8,
    nuclei_protocol,
    protocol_to_json,
)
from .manifest import REQUIRED_FIELDS, build_manifest, check_manifest, write_manifest
from .pack import build_pack, load_objects_npz, save_objects_npz

__all__ = [
    "HELDOUT_PACKAGES",
    "HELDOUT_ROLES",
    "SOURCES",
    "TRAINING_ROLES",
    "Source",
    "source_by_key",
    "FetchError",
    "default_cache_dir",
    "fetch_source",
    "read_member",
    "NucleiProtocol",
    "Picture",
    "RealObjects",
    "assert_trainable",
    "boxes_from_masks",
    "decode_image",
    "labels_to_masks",
    "load_mask_shapes",
    "load_pictures",
    "load_real_objects",
    "normalize_to_uint8",
    "nuclei_protocol",
    "protocol_to_json",
    "REQUIRED_FIELDS",
    "build_manifest",
    "check_manifest",
    "write_manifest",
    "build_pack",
    "load_objects_npz",
    "save_objects_npz",
]
