import pytest
import torch

# The tests use tiny tensors: intra-op threads only add synchronization. On the 2-core dev box a tiny
# convnet's forward+backward took ~0.3 s with 2 threads against ~1 ms with one.
# (`import ssam`, `train`, `lab`, `bench`: the editable install of `make venv`, pyproject.toml.)
torch.set_num_threads(1)


@pytest.fixture
def straight_and_resumed(tmp_path, monkeypatch):
    """run(make_cfg, crash_at) -> (final a, final b, ckpt a, ckpt b): train.py straight through into a/, and
    into b/ with train_step raising KeyboardInterrupt at its crash_at-th call, then --resume into b/.
    make_cfg(*flags) builds the run's Config with those flags added."""
    import train

    def run(make_cfg, crash_at):
        a = train.train(make_cfg("--out-dir", str(tmp_path / "a")), show_config=False)
        real_step, calls = train.train_step, []

        def crashing_step(*args, **kw):
            calls.append(1)
            if len(calls) == crash_at:
                raise KeyboardInterrupt
            return real_step(*args, **kw)

        monkeypatch.setattr(train, "train_step", crashing_step)
        with pytest.raises(KeyboardInterrupt):
            train.train(make_cfg("--out-dir", str(tmp_path / "b")), show_config=False)
        monkeypatch.setattr(train, "train_step", real_step)
        b = train.train(make_cfg("--out-dir", str(tmp_path / "b"), "--resume"), show_config=False)
        return a, b, *(torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")

    return run
