"""``python -m launch.slurm --help``: see ``maspo_megatron.launch.slurm``."""

import sys

from maspo_megatron.launch.slurm import main

if __name__ == "__main__":
    sys.exit(main())
