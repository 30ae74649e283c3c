import os
import sys

import pytest
import torch

# Keep the 2-core CI machine responsive when several gloo processes run at once.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
# Test doubles (the SGLang emulator for GPU images without SGLang) are importable by name.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "doubles"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run scripts/gpu_tests.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
