"""The launchers, run from the repository root (``launch/`` is not an installed package):

- ``python -m launch.slurm``: a Slurm heterogeneous job through nemo-run (rollout group + torchrun
  group), in containers or bare-metal;
- ``python -m launch.local``: the same two parts on one machine (nemo-run's LocalExecutor).

``plan`` checks a recipe + overrides against the nodes before anything is submitted; ``node`` is
what runs on each node (``python -m launch.node rollout|train``, from the job's shipped code
directory). Dependencies point from here into ``maspo_megatron`` only, never back.
"""
