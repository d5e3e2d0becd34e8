"""Tests of bench/gpu_check.py that run on the CPU: `make gpu-check` must fail (exit 1, a message) when the
2:4 kernel never ran, instead of printing "ok" for a comparison of the dense fallback with itself."""

import pytest
import torch

import ssam
from bench import gpu_check


def test_kernel_that_never_ran_fails_the_script(monkeypatch, capsys):
    monkeypatch.setattr(
        gpu_check, "check_sparse_input_grad", lambda device, rows: None
    )  # fp16 matmuls crawl on a CPU
    monkeypatch.setattr(gpu_check, "check_steps", lambda device, rows: None)  # 30 s; not the point here
    assert gpu_check.main(["--cpu", "--no-bench"]) == 0  # on the CPU the kernel is not expected
    out = capsys.readouterr().out
    assert "not expected on cpu" in out and "0 correctness failure(s)" in out
    # as on a GPU where torch.sparse semi-structured refuses everything: the CPU's case exactly
    monkeypatch.setattr(gpu_check, "expects_kernel", lambda device: True)
    assert gpu_check.main(["--cpu", "--no-bench"]) == 1
    out = capsys.readouterr().out
    assert "the 2:4 kernel never ran in the ascent pass (dense vs dense)" in out
    assert "NEVER: every shape fell back to the dense product" in out and "2 correctness failure(s)" in out


def test_kernel_runs_are_counted_and_refusals_are_not(monkeypatch):
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda t: t)  # a "kernel" that accepts
    w, gy, mask = torch.randn(8, 4), torch.randn(3, 8), torch.ones(8, 4)
    with gpu_check.count_kernel_runs() as runs:
        ssam.semi_structured_mm(gy, w)
        ssam.semi_structured_mm(gy, w)
        with gpu_check.semi_structured_refused():  # the compression raises: not a run
            with pytest.raises(RuntimeError, match="refused by gpu_check"):
                ssam.semi_structured_mm(gy, w)
            torch.testing.assert_close(ssam.sparse_input_grad(gy, w, mask), gy @ w)  # the dense fallback
    assert runs == [2]
    assert torch.sparse.to_sparse_semi_structured(w) is w  # the "kernel" is back after the refusal
    assert gpu_check.kernel_verdict("cuda", 0)[2] is False and gpu_check.kernel_verdict("cuda", 3)[2] is True
    assert gpu_check.kernel_verdict("cpu", 0)[2] is None
