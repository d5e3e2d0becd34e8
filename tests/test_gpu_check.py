"""Tests of bench/gpu_check.py that run on the CPU: `make gpu-check` must fail (exit 1, a message) when the
2:4 kernel never ran, instead of printing "ok" for a comparison of the dense fallback with itself."""

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
    monkeypatch.setattr(ssam, "_REFUSED", set(), raising=False)
    with gpu_check.count_kernel_runs() as runs:
        torch.sparse.to_sparse_semi_structured(torch.ones(2))
        torch.sparse.to_sparse_semi_structured(torch.ones(2))
        ssam._REFUSED.add("shape whose matmul failed after compression")
    assert runs == [1]
    with gpu_check.semi_structured_refused():  # refusing on purpose leaves ssam's memory as it was
        ssam._REFUSED.add("refused by gpu_check")
    assert ssam._REFUSED == {"shape whose matmul failed after compression"}
    assert gpu_check.kernel_verdict("cuda", 0)[2] is False and gpu_check.kernel_verdict("cuda", 3)[2] is True
    assert gpu_check.kernel_verdict("cpu", 0)[2] is None
