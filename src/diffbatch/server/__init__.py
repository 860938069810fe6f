"""diffbatch serve: an OpenAI-compatible image server over the step-level engine.

FastAPI and uvicorn are optional (``pip install "diffbatch[server]"``); they are imported only here.
"""

from .app import create_app
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
