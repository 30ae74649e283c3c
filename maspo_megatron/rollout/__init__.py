"""Rollouts over SGLang's HTTP API and weight sync into SGLang servers.

- ``client``: async /generate client (``RolloutClient``, ``RolloutRequest``, ``Sample``).
- ``servers``: SGLang / CPU server and sglang-router processes (``ServerManager``, ``RouterManager``).
- ``weight_sync``: trainer -> servers weights every step (``WeightSyncer``, ``WeightSyncConfig``):
  ``mode="distributed"`` (NCCL/gloo broadcast of flattened buckets), ``"disk"`` (safetensors),
  ``"colocated"`` (CUDA-IPC handles through /update_weights_from_tensor, servers on the trainer's
  GPUs, with ``release_memory`` / ``resume_memory`` around training).
- ``cpu_server``: the same protocol around an HF model (demo and tests); ``--device cuda`` makes
  it a colocated CUDA-IPC receiver.
- ``protocol``: what both ends agree on (sampling params, flattened_bucket, process group, the
  CUDA-IPC payload pickled as SGLang's ``MultiprocessingSerializer`` does).
"""
