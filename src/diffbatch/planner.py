"""The planner: decides which requests run in the next engine step. Pure Python, no torch.

Policy: oldest first. The group (latent shape) of the oldest unfinished request runs; its batch is filled with
running requests of that shape (oldest first), then with waiting ones, up to ``max_batch_size`` images.
Requests that finished denoising are decoded at the start of the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .request import Request, RequestStatus


@dataclass
class StepPlan:
    """What the runner must do in one engine step."""

    decode: list[Request] = field(default_factory=list)  # finished denoising: decode to images
    prepare: list[Request] = field(default_factory=list)  # newly admitted: encode prompts, make latents
    denoise: list[Request] = field(default_factory=list)  # one denoiser call over these (prepare included)

    @property
    def is_empty(self) -> bool:
        return not (self.decode or self.denoise)


class Planner:
    def __init__(self, max_batch_size: int, batch_limit: Callable[[tuple[int, int]], int] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} is invalid: must be >= 1")
        self.max_batch_size = max_batch_size
        # Per shape, at most max_batch_size: memory.StageLimit (estimated from memory, lowered after an OOM).
        self.batch_limit = batch_limit
        self.requests: dict[int, Request] = {}  # unfinished, in arrival order

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> StepPlan:
        plan = StepPlan(decode=self._with_status(RequestStatus.DECODING))
        active = [r for r in self.requests.values() if r.status <= RequestStatus.RUNNING]
        if not active:
            return plan
        shape = active[0].shape_key  # the oldest active request decides the group
        group = [r for r in active if r.shape_key == shape]
        running = [r for r in group if r.status == RequestStatus.RUNNING]
        waiting = [r for r in group if r.status == RequestStatus.WAITING]
        plan.denoise = (running + waiting)[: self._limit(shape)]
        plan.prepare = [r for r in plan.denoise if r.status == RequestStatus.WAITING]
        return plan

    def _limit(self, shape: tuple[int, int]) -> int:
        if self.batch_limit is None:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self.batch_limit(shape)))

    def update(self, plan: StepPlan) -> list[Request]:
        """Advance request states after the runner executed ``plan``; return the requests now finished."""
        finished = [r for r in plan.decode if r.status == RequestStatus.DECODING]  # not a pass continuing (hires)
        for request in finished:
            request.status = RequestStatus.FINISHED
            del self.requests[request.request_id]
        for request in plan.denoise:
            request.step_index += 1
            done = request.step_index >= request.num_steps
            request.status = RequestStatus.DECODING if done else RequestStatus.RUNNING
        return finished

    def _with_status(self, status: RequestStatus) -> list[Request]:
        return [r for r in self.requests.values() if r.status == status]

    def abort(self, request_ids: Iterable[int]) -> None:
        for request_id in request_ids:
            self.requests.pop(request_id, None)
