"""`homefleet model add|list`: register source models (ONNX) and see what is registered."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import grpc
import typer

from artifact.names import InvalidNameError, check_name
from controller.cli import output, pages, views
from controller.cli.client import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    ControllerOption,
    TimeoutOption,
    session,
)
from controller.cli.output import JsonOption
from controller.cli.upload import FILE_PARAM, UploadStream, progress_bar, read_model_file
from protos import fleet_pb2

app = typer.Typer(
    name="model",
    help="Register source models (ONNX files) with the controller and list them.",
    no_args_is_help=True,
)


def _spec(tensor: views.TensorView) -> str:
    """``x float32[?,6,100]``: a dynamic dimension (-1) shows as ``?``."""
    dims = ",".join("?" if d < 0 else str(d) for d in tensor.shape)
    return f"{tensor.name} {tensor.dtype}[{dims}]"


def _specs(tensors: list[views.TensorView]) -> str:
    return ", ".join(_spec(t) for t in tensors) or "-"


def _describe(model: views.ModelView) -> str:
    return (
        f"{model.name} v{model.version} (sha256 {output.short_sha(model.sha256)}, "
        f"{output.human_size(model.size_bytes)}; inputs: {_specs(model.inputs)}; "
        f"outputs: {_specs(model.outputs)})"
    )


def _valid_name(value: str) -> str:
    """Checked here too, so a typo is a usage error (exit 2) even with no controller."""
    try:
        return check_name(value, field="model name")
    except InvalidNameError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("add")
def add(
    name: Annotated[
        str,
        typer.Argument(
            metavar="NAME",
            help="Model name: lowercase letters, digits, . _ -",
            callback=_valid_name,
        ),
    ],
    file: Annotated[
        Path,
        typer.Argument(
            metavar=FILE_PARAM,
            exists=True,
            dir_okay=False,
            readable=True,
            help="The ONNX model file to upload.",
        ),
    ],
    description: Annotated[
        str, typer.Option("--description", help="A note shown in `model list`.")
    ] = "",
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Upload an ONNX model; adding a name again registers its next version."""
    model_file = read_model_file(file)
    with session(controller, timeout) as client, progress_bar(model_file) as progress:
        task = progress.add_task(file.name, total=model_file.size_bytes)
        stream = UploadStream(
            model_file,
            name=name,
            description=description,
            on_chunk=lambda n: progress.advance(task, n),
        )
        try:
            reply = client.add_model(iter(stream), size_bytes=model_file.size_bytes)
            # registered: a Ctrl-C from here on must not make it look failed (exit 130)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except KeyboardInterrupt:
            typer.echo(
                f"interrupted: the upload of {file} was cancelled; had the controller "
                f"stored it already, `homefleet model list` shows {name}'s new version",
                err=True,
            )
            raise typer.Exit(130) from None
        except grpc.RpcError:
            if stream.read_error is not None:
                raise typer.BadParameter(
                    f"reading {file} failed during the upload: "
                    f"{stream.read_error.strerror or stream.read_error}",
                    param_hint=FILE_PARAM,
                ) from None
            raise
    model = views.model_from_proto(reply)
    if reply.interface_change:
        output.note(f"{model.name} v{model.version}: {reply.interface_change}")
    if reply.repaired:
        output.note(
            f"{model.name} v{model.version}: these bytes replaced a corrupt stored copy "
            "(kept under the controller's blobs/corrupt/; `homefleet events` has blob.repaired)"
        )
    if as_json:
        output.print_json(model)
    elif reply.unchanged:
        output.say(f"unchanged: these bytes already are model {_describe(model)}")
    else:
        output.say(f"added model {_describe(model)}")


PAGE_SIZE = pages.PAGE_SIZE  # model versions asked for per ListModels call


@app.command("list")
def list_models(
    limit: Annotated[
        int,
        typer.Option(
            "--limit", min=0, metavar="N", help="Show at most N (by name, version); 0: all."
        ),
    ] = 0,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """List registered models, every version (fetched page by page)."""
    with session(controller, timeout) as client:

        def page(size: int, token: str) -> tuple[list[fleet_pb2.Model], str]:
            reply = client.list_models(
                fleet_pb2.ListModelsRequest(page_size=size, page_token=token)
            )
            return list(reply.models), reply.next_page_token

        fetched = pages.fetch_pages(page, limit, PAGE_SIZE)
    if fetched.more:
        output.note(
            f"showing the first {len(fetched.items)} model versions; more exist "
            "(--limit 0 shows all)"
        )
    models = views.ModelList(
        models=[views.model_from_proto(m) for m in fetched.items], more=fetched.more
    )
    if as_json:
        output.print_json(models)
        return
    table = output.table(
        "model", "version", "sha256", "size", "inputs", "outputs", "created", "description"
    )
    for m in models.models:
        output.add_row(
            table,
            m.name,
            f"v{m.version}",
            output.short_sha(m.sha256),
            output.human_size(m.size_bytes),
            _specs(m.inputs),
            _specs(m.outputs),
            output.local_time(m.created_unix_ms),
            m.description,
        )
    output.print_table(table, empty="no models registered (homefleet model add NAME FILE)")
