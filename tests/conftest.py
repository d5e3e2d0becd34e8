import torch

# `ssam`, `train`, `lab` and `bench` are importable through the editable install (make venv; pyproject.toml)
# from any cwd, whether pytest is run as `pytest` or `python -m pytest`: no sys.path edit.

# The tests use tiny tensors: intra-op threads only add synchronization. On the 2-core dev box a tiny
# convnet's forward+backward took ~0.3 s with 2 threads against ~1 ms with one.
torch.set_num_threads(1)
