"""pytest-benchmark setup for bench/: size options, the machine in the JSON.

    # the CPU:
    OMP_WAIT_POLICY=PASSIVE pytest bench/ --benchmark-only --benchmark-json bench/results/throughput.json
    pytest bench/ --benchmark-only --bench-device cuda --bench-batch 128 --bench-width 512 \\
        --bench-rounds 20 --benchmark-json bench/results/throughput-gpu.json      # a GPU
"""

import os
import sys

# libgomp's default is to spin while waiting for the other thread: on a box shared with other jobs a
# descheduled thread then costs the whole step (measured: a 0.6 s step took 2.9-3.1 s). Passive waiting is
# immune. Must be set before torch loads libgomp; `make bench-throughput` sets it in the environment as well.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("bench", "ssam benchmark sizes (defaults: CIFAR sizes on a CPU)")
    g.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    g.addoption("--bench-batch", type=int, default=32, help="training batch (the paper: 128)")
    g.addoption("--bench-width", type=int, default=256, help="TinyViT width (multiple of 4*heads=16)")
    g.addoption("--bench-models", default="resnet18,vit", help="comma-separated: resnet18, vit")
    g.addoption(
        "--bench-rounds",
        type=int,
        default=10,
        help="rounds; each times every method once, so methods "
        "alternate in time and share the machine's ups and downs (default 10)",
    )
    g.addoption(
        "--bench-first-step-calls", type=int, default=20, help="timed first_step calls per method and round"
    )
    g.addoption(
        "--bench-update-rounds", type=int, default=3, help="rounds of the mask-update group (default 3)"
    )
    g.addoption("--bench-fisher-samples", type=int, default=128, help="SSAM-F's N_F (the paper: 128)")
    g.addoption("--bench-train-steps", type=int, default=30, help="SGD steps that make the 'trained' weights")
    g.addoption("--bench-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    g.addoption("--bench-methods", default="", help="comma-separated common.METHODS keys: time only these")


@pytest.fixture(scope="session")
def cfg(request):
    o = request.config.getoption
    if o("--bench-threads"):
        torch.set_num_threads(o("--bench-threads"))
    if o("--bench-device").startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device")
    return dict(
        device=o("--bench-device"),
        batch=o("--bench-batch"),
        width=o("--bench-width"),
        first_step_calls=o("--bench-first-step-calls"),
        fisher_samples=o("--bench-fisher-samples"),
        train_steps=o("--bench-train-steps"),
    )


def pytest_generate_tests(metafunc):
    for name, option in (("bench_round", "--bench-rounds"), ("update_round", "--bench-update-rounds")):
        if name in metafunc.fixturenames:  # first: the outermost loop
            metafunc.parametrize(name, range(metafunc.config.getoption(option)), ids=lambda i: f"round{i}")
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", metafunc.config.getoption("--bench-models").split(","))


def pytest_collection_modifyitems(config, items):
    """--bench-methods: only the benchmarks of those methods (make bench-frontier-throughput)."""
    names = [m for m in config.getoption("--bench-methods").split(",") if m]
    unknown = sorted(set(names) - set(common.METHODS))
    if unknown:
        raise pytest.UsageError(f"--bench-methods: unknown {unknown}; known: {', '.join(common.METHODS)}")
    if names:
        out = [
            it
            for it in items
            if getattr(it, "callspec", None) and it.callspec.params.get("method") not in names
        ]
        config.hook.pytest_deselected(items=out)
        items[:] = [it for it in items if it not in out]


def pytest_sessionstart(session):
    session.config.bench_machine = common.machine()  # CPU, cores, torch, GPU, load average at the start


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["bench"] = dict(
        getattr(config, "bench_machine", {}),
        threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(default: active)"),
    )
    if hasattr(os, "getloadavg"):  # and at the end: other jobs on the box skew timings
        machine_info["bench"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
