import torch

# The tests use tiny tensors: intra-op threads only add synchronization. On the 2-core dev box a tiny
# convnet's forward+backward took ~0.3 s with 2 threads against ~1 ms with one.
# (`import ssam`, `train`, `lab`, `bench`: the editable install of `make venv`, pyproject.toml.)
torch.set_num_threads(1)
