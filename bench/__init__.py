"""`make bench`: HomeFleet's numbers, measured against a peer in the same run.

Each section measures one capability against the thing it replaces (a compressed
artifact against its FP32 source, …) on this machine, in one process, interleaving
the contenders so machine noise hits both alike. Results go to ``bench/results.json``
(raw) and ``bench/RESULTS.md`` (tables, ratios, the command that reproduces them),
with plots under ``bench/plots/``.
"""
