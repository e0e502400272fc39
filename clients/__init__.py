"""Python clients for the peftserve HTTP API."""

from .client import PeftServeClient, PeftServeError

__all__ = ["PeftServeClient", "PeftServeError"]
