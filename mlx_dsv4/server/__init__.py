"""OpenAI- and Anthropic-compatible HTTP server (`mlx_dsv4 serve`)."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
