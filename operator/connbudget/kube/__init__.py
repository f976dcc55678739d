"""Kubernetes I/O through the official client: the only layer that imports ``kubernetes``."""
