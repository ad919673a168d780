"""The `homefleet` command: wires the edge agent's and the controller's commands together.

It owns no logic: `homefleet agent ...` needs only the `edge` extra, the operator
commands only gRPC, and `homefleet controller serve` the `controller` extra.
"""
