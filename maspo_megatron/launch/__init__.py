"""Launching a run: a Slurm heterogeneous job or a local machine, through nemo-run.

- ``plan``: checks a recipe + overrides against the node/GPU counts before anything is submitted.
- ``node``: what runs on each node (SGLang servers + router, or torchrun); stdlib + ``rollout.servers``
  only, so it also runs in the SGLang container, which lacks megatron-core.
- ``slurm`` / ``local``: nemo-run executors, sbatch dry-run, and the CLIs behind
  ``python -m launch.slurm`` / ``python -m launch.local`` (thin wrappers in the repo's ``launch/``).

The code lives in the package (not only in ``launch/``) so that it installs with
``pip install maspo-megatron[launch]``, is importable by tests without path tricks, and so that the
node entry point is found inside the containers as ``python -m maspo_megatron.launch.node``.
"""
