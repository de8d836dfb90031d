"""The HTTP and websocket application."""

from server.app.main import create_app

__all__ = ["create_app"]
