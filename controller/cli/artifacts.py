"""`homefleet artifact create|list`: build a device class's artifact from a model, and list them."""

from __future__ import annotations

from typing import Annotated

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
from protos import fleet_pb2

app = typer.Typer(
    name="artifact",
    help="Create signed artifacts of a model for a device class, and list them.",
    no_args_is_help=True,
)


def _expires(artifact: views.ArtifactView) -> str:
    return output.local_datetime(artifact.manifest.expires_at if artifact.manifest else None)


def _param(value: object) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text  # a digest: its first 12, as sha256


def describe_recipe(artifact: views.ArtifactView) -> str:
    """How the bytes were made, from the signed manifest, in the words `jobs` and
    `compress` use (parameters that differ from their defaults); "source" for the model
    as uploaded; what a rollback re-releases. A step this build does not know is shown
    with every parameter the manifest has."""
    from pydantic import ValidationError

    from controller.compression.recipe import STEP_ADAPTER, Recipe

    manifest = artifact.manifest
    if manifest is None:
        return "-"
    if manifest.rereleases:
        return f"re-release of {manifest.rereleases}"
    steps = [step for step in manifest.recipe if step.kind != "identity"]
    try:
        parsed = [STEP_ADAPTER.validate_python({"kind": s.kind, **s.params}) for s in steps]
        return Recipe(steps=tuple(parsed)).describe()
    except ValidationError:
        return " → ".join(
            f"{s.kind}({', '.join(f'{k}={_param(v)}' for k, v in s.params.items())})"
            if s.params
            else s.kind
            for s in steps
        )


def _valid_model(value: str) -> str:
    """Names are checked here too, so a typo is a usage error (exit 2) naming the flag."""
    try:
        return check_name(value, field="model name")
    except InvalidNameError as exc:
        raise typer.BadParameter(str(exc)) from None


def _valid_class(value: str) -> str:
    try:
        return check_name(value, field="device class")
    except InvalidNameError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("create")
def create(
    model: Annotated[
        str,
        typer.Argument(metavar="MODEL", callback=_valid_model, help="Name of a registered model."),
    ],
    device_class: Annotated[
        str,
        typer.Option(
            "--class",
            metavar="CLASS",
            callback=_valid_class,
            help="Device class the artifact is for.",
        ),
    ],
    model_version: Annotated[
        int,
        typer.Option("--model-version", min=0, metavar="N", help="Model version; 0 = latest."),
    ] = 0,
    expires_in_days: Annotated[
        int,
        typer.Option(
            "--expires-in-days",
            min=0,
            max=3650,
            metavar="DAYS",
            help="Manifest lifetime, at most 3650; 0 = default (365).",
        ),
    ] = 0,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Create the next artifact version of MODEL for a device class, signed by the controller."""
    request = fleet_pb2.CreateArtifactRequest(
        model_name=model,
        model_version=model_version,
        device_class=device_class,
        expires_in_days=expires_in_days,
    )
    with session(controller, timeout) as client:
        reply = client.create_artifact(request)
    artifact = views.artifact_from_proto(reply)
    if as_json:
        output.print_json(artifact)
        return
    source = (
        f"model {artifact.manifest.model_name} v{artifact.manifest.model_version}, "
        if artifact.manifest
        else ""
    )
    output.say(
        f"created artifact {artifact.id} ({source}sha256 {output.short_sha(artifact.sha256)}, "
        f"{output.human_size(artifact.size_bytes)}, expires {_expires(artifact)})"
    )
    if artifact.warning:
        output.note(artifact.warning)


PAGE_SIZE = pages.PAGE_SIZE  # artifacts asked for per ListArtifacts call


@app.command("list")
def list_artifacts(
    model: Annotated[str, typer.Option("--model", metavar="MODEL", help="Only this model.")] = "",
    device_class: Annotated[
        str, typer.Option("--class", metavar="CLASS", help="Only this device class.")
    ] = "",
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            min=0,
            metavar="N",
            help="Show at most N artifacts (by model, class, version); 0: all.",
        ),
    ] = 0,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """List artifacts, optionally of one model or device class (fetched page by page)."""
    with session(controller, timeout) as client:

        def page(size: int, token: str) -> tuple[list[fleet_pb2.Artifact], str]:
            reply = client.list_artifacts(
                fleet_pb2.ListArtifactsRequest(
                    model_name=model, device_class=device_class, page_size=size, page_token=token
                )
            )
            return list(reply.artifacts), reply.next_page_token

        fetched = pages.fetch_pages(page, limit, PAGE_SIZE)
    found = fetched.items
    if fetched.more:
        output.note(f"showing the first {len(found)} artifacts; more exist (--limit 0 shows all)")
    artifacts = views.ArtifactList(
        artifacts=[views.artifact_from_proto(a) for a in found], more=fetched.more
    )
    if as_json:
        output.print_json(artifacts)
        return
    table = output.table("artifact", "model", "recipe", "sha256", "size", "created", "expires")
    for a in artifacts.artifacts:
        output.add_row(
            table,
            a.id,
            f"{a.model_name} v{a.manifest.model_version}" if a.manifest else a.model_name,
            describe_recipe(a),
            output.short_sha(a.sha256),
            output.human_size(a.size_bytes),
            output.local_time(a.created_unix_ms),
            _expires(a),
        )
    which = (f" of model {model}" if model else "") + (
        f" for class {device_class}" if device_class else ""
    )
    output.print_table(table, empty=f"no artifacts{which}")
