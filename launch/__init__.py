"""Thin entry points: ``python -m launch.slurm`` and ``python -m launch.local`` from the repo root.

The implementation is ``maspo_megatron.launch`` (installed with the package).
"""
