"""The HTTP layer: an app factory and one module per facade. Facades translate; they hold no maths."""

from eztinker.api.app import create_app

__all__ = ["create_app"]
