"""registry-replicator: keep container registries in several regions in sync and clean."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("registry-replicator")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
