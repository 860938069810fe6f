"""diffbatch serve: an OpenAI-compatible image server over the step-level engine.

FastAPI and uvicorn are optional (``pip install "diffbatch[server]"``); they are imported only here. ``create_app``
loads on first use, with torch and diffusers, so ``diffbatch --help`` (which registers ``serve`` from
``server.cli``) answers without them.
"""

from typing import TYPE_CHECKING, Any

from .config import ServerConfig

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'diffbatch.server' has no attribute {name!r}")
