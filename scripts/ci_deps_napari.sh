#!/usr/bin/env bash
# System and Python test dependencies of the napari plugin (issue 4). Idempotent: safe to run twice.
#  - Xvfb plus the xcb/GL/font libraries Qt's xcb platform and napari's OpenGL canvas (Mesa) need;
#    the napari tests start Xvfb themselves when no DISPLAY is set.
#  - a Qt binding (plugins never depend on one; the tests bring PyQt6; napari deprecates PyQt5), napari, pytest-qt, npe2,
#    scikit-image (sample data), platformdirs (cache dir).
set -euo pipefail

APT_PKGS=(
    xvfb xauth
    libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xinerama0
    libxcb-xkb1 libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-cursor0 libxcb-sync1
    libxcb-xinput0 libxkbcommon-x11-0 libxkbcommon0
    libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri libglib2.0-0 libfontconfig1 libdbus-1-3
    fonts-dejavu-core
)

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python -m pip install -q \
    "napari>=0.5" "magicgui>=0.8" "qtpy>=2.4" "PyQt6>=6.5" \
    "npe2" "pytest-qt>=4.4" "pytest>=8" "pytest-timeout>=2.3" \
    "scikit-image>=0.22" "platformdirs>=3"
