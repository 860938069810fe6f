"""What the routes share: built in the app's lifespan, kept on ``app.state.server``."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import Engine
from .config import ServerConfig
from .jobs import JobRunner
from .loop import EngineLoop
from .metrics import Metrics
from .store import Store


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    loop: EngineLoop
    store: Store
    jobs: JobRunner
    metrics: Metrics
