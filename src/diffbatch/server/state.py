"""What the routes share: built in the app's lifespan, kept on ``app.state.server``."""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass, field

from ..engine import Engine
from ..executors.base import Executor
from .config import ServerConfig
from .jobs import JobRunner
from .keys import KeyLimiter
from .metrics import Metrics
from .retention import Janitor
from .store import Store


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    loop: Executor
    store: Store
    jobs: JobRunner
    metrics: Metrics
    janitor: Janitor
    limiter: KeyLimiter | None  # per-key limits (--api-keys), or None
    # Images in flight by the client's request_id (an extension field), so POST /v1/images/cancel finds them
    running: dict[str, list[concurrent.futures.Future]] = field(default_factory=dict)
    running_lock: threading.Lock = field(default_factory=threading.Lock)
    # Batch jobs are planned and stored one at a time on a thread of their own: a job that takes long to plan or
    # to write (100,000 lines) never holds the event loop or the threads online requests are admitted on
    planning: concurrent.futures.ThreadPoolExecutor = field(default_factory=lambda: (
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffbatch-planning")))
