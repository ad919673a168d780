"""How a worker process tells the controller what it is doing: JSON lines in a file.

The worker appends one line per event (it started, what it works on now, a trial
finished) and flushes; the
controller reads complete lines from where it stopped. A file needs no extra process
(a multiprocessing manager would) and nothing is lost if the controller reads late.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from controller.records import TrialRecord


class _Line(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Started(_Line):
    kind: Literal["started"] = "started"
    pid: int


class Activity(_Line):
    """What the job works on now, before work that takes long (a trial's build)."""

    kind: Literal["activity"] = "activity"
    text: str


class Warned(_Line):
    """A warning the compression code logged (too few calibration samples, say): the
    operator watching the job must hear it, not only the controller's log."""

    kind: Literal["warning"] = "warning"
    text: str


class TrialDone(_Line):
    kind: Literal["trial"] = "trial"
    index: int
    summary: str
    recipe: str
    met: bool
    artifact_bytes: int
    quality_metric: str = ""
    quality_value: float = 0.0
    p95_ms: float = 0.0
    energy_mj: float = 0.0
    seconds: float = 0.0
    error: str = ""

    def record(self) -> TrialRecord:
        return TrialRecord(**self.model_dump(exclude={"kind"}))

    @classmethod
    def of(cls, trial: TrialRecord) -> TrialDone:
        return cls(**trial.__dict__)


Line = Started | Activity | Warned | TrialDone
ProgressLine = Annotated[Line, Field(discriminator="kind")]
_LINE: TypeAdapter[Line] = TypeAdapter(ProgressLine)


class ProgressWriter:
    """The worker's side: append a line and flush, so the reader sees it at once."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def write(self, line: Line) -> None:
        with self._path.open("a", encoding="utf-8") as f:
            f.write(line.model_dump_json() + "\n")
            f.flush()


class ProgressReader:
    """The controller's side: the complete lines added since the last call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0

    def read_new(self) -> list[Line]:
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        lines = []
        for raw in data[: end + 1].splitlines():
            try:
                lines.append(_LINE.validate_json(raw))
            except ValidationError:  # never written by our worker; skip rather than stall
                continue
        return lines
