"""napari plugin for RWKV-SAM (npe2 manifest: ``napari.yaml``).

The dock widget lives in :mod:`napari_plugin._widget`, the Qt-free prompt/label conversions in
:mod:`napari_plugin._conversion` and the sample data in :mod:`napari_plugin._sample_data`. Importing
this package imports neither Qt nor torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
