"""Rollouts over SGLang's HTTP API and weight sync into SGLang servers.

- ``client``: async /generate client (``RolloutClient``, ``RolloutRequest``, ``Sample``).
- ``servers``: SGLang / CPU server and sglang-router processes (``ServerManager``, ``RouterManager``).
- ``weight_sync``: trainer -> servers weights every step (``WeightSyncer``, ``WeightSyncConfig``).
- ``cpu_server``: the same protocol on CPU around an HF model (demo and tests).
- ``protocol``: what both ends agree on (sampling params, flattened_bucket, process group).
"""
