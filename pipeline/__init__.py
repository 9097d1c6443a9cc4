"""piadm: block-parallel Picard sampling of diffusion models for ensembles of physics fields."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("piadm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0+src"
