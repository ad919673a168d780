"""Operator commands: talk to a running controller's AdminService over gRPC.

These modules import only grpc, protos, typer, rich, pydantic and artifact — never the
controller's server, store or compression code — so `homefleet` stays quick to start
and runs on machines without the `controller` extra.
"""
