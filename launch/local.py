"""``python -m launch.local --help``: see ``maspo_megatron.launch.local``."""

import sys

from maspo_megatron.launch.local import main

if __name__ == "__main__":
    sys.exit(main())
