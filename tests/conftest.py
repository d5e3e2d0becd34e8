import os
import sys

import torch

# `import ssam` from the repository root whether pytest is run as `pytest` or `python -m pytest`, from any cwd.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The tests use tiny tensors: intra-op threads only add synchronization. On the 2-core dev box a tiny convnet's
# forward+backward took ~0.3 s with 2 threads against ~1 ms with one.
torch.set_num_threads(1)
