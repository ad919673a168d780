"""Sending a model file to AddModel: read and digested locally first, then streamed.

The file is checked before anything is sent, so a missing or unreadable file is a
usage error (exit 2), not a half-finished upload. The stream is the header (name,
description, size and sha256 computed here) followed by fixed-size data chunks, so
memory stays flat whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from artifact.digest import sha256_file
from controller.cli import output
from protos import fleet_pb2

CHUNK_BYTES = 256 * 1024
# Smaller files go up in a blink; a bar would only flicker.
PROGRESS_MIN_BYTES = 4 * 1024 * 1024
FILE_PARAM = "FILE.onnx"


@dataclass(frozen=True)
class ModelFile:
    path: Path
    size_bytes: int
    sha256: str


def read_model_file(path: Path) -> ModelFile:
    """Size and digest of ``path``; a file that cannot be read is a usage error."""
    try:
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a regular file", param_hint=FILE_PARAM)
        size = path.stat().st_size
        if size == 0:
            raise typer.BadParameter(
                f"{path} is empty; give an ONNX model file", param_hint=FILE_PARAM
            )
        return ModelFile(path=path, size_bytes=size, sha256=sha256_file(path))
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror or exc}", param_hint=FILE_PARAM
        ) from exc


class UploadStream:
    """The AddModel request stream. gRPC reads it on its own thread, so a read error
    is kept here for the command to report as a file problem rather than a failed call."""

    def __init__(
        self,
        file: ModelFile,
        *,
        name: str,
        description: str,
        on_chunk: Callable[[int], None],
    ) -> None:
        self.file = file
        self.name = name
        self.description = description
        self.on_chunk = on_chunk
        self.read_error: OSError | None = None

    def __iter__(self) -> Iterator[fleet_pb2.AddModelChunk]:
        yield fleet_pb2.AddModelChunk(
            header=fleet_pb2.AddModelHeader(
                name=self.name,
                description=self.description,
                size_bytes=self.file.size_bytes,
                sha256=self.file.sha256,
            )
        )
        try:
            with self.file.path.open("rb") as f:
                while block := f.read(CHUNK_BYTES):
                    self.on_chunk(len(block))
                    yield fleet_pb2.AddModelChunk(data=block)
        except OSError as exc:
            self.read_error = exc
            raise


def progress_bar(file: ModelFile) -> Progress:
    """A transfer bar on stderr for large files on a terminal; silent otherwise."""
    console = output.stderr()
    return Progress(
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(),  # decimal units, as TransferSpeedColumn shows MB/s
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=file.size_bytes < PROGRESS_MIN_BYTES or not console.is_terminal,
    )
