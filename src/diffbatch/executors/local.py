"""Run a job's remaining images on this process's engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..engine import Engine, Result
from ..io.writer import OutputWriter
from ..spec import GenerationSpec


def run_local(engine: Engine, specs: Sequence[GenerationSpec], todo: Sequence[int], writer: OutputWriter,
              on_written: Callable[[], None] = lambda: None) -> None:
    """Make the images ``todo`` (indices into ``specs``, resolved) and write each as it finishes."""
    def on_result(result: Result) -> None:
        k = todo[result.index]  # the engine numbers this call's images 0..len(todo)-1
        writer.write(k, result)
        on_written()

    engine.generate([specs[k] for k in todo], on_result=on_result, resolved=True)
