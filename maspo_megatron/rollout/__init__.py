"""Rollouts and weight sync, written against one backend interface (``backend.py``).

- ``backend``: what an inference engine supplies (server command, generate wire format, weight
  update calls) and the engine-neutral types (``SamplingConfig``, ``ServerSpec``).
- ``sglang/``: SGLang 0.5.23 as that backend (GPU, and its CPU engine with a pure-torch stand-in
  for the one sgl-kernel CPU op it calls).
- ``client``: async generate client (``RolloutClient``, ``RolloutRequest``, ``Sample``).
- ``servers``: server and sglang-router processes (``ServerManager``, ``RouterManager``).
- ``weight_sync``: trainer -> servers weights every step (``WeightSyncer``, ``WeightSyncConfig``):
  ``mode="distributed"`` (NCCL/gloo broadcast of flattened buckets), ``"disk"`` (safetensors),
  ``"colocated"`` (CUDA-IPC handles, servers on the trainer's GPUs).
"""
