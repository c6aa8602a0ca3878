"""The package version: a leaf module, so anything (the graph-cache key, AOT manifests) can read it
without importing the package's public API."""
__version__ = "0.1.0"
