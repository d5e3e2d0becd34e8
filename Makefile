# ssam — the commands people run. `make test` and `make demo` create .venv on first use.
PY      ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python

.PHONY: test demo venv clean mutation reproduce-cifar reproduce-cifar-short reproduce-imagenet subset bench-throughput bench-report bench-accuracy bench-frontier bench-frontier-throughput gpu-check

venv: $(VENV)/.installed
# pyproject.toml names the packages, constraints.txt pins the versions: a fresh clone installs the tested set
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -c constraints.txt --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[test,loops,bench]"
	touch $@

# ruff first (config in pyproject.toml): a lint or layout violation fails `make test`, as a failing test does
test: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PYTHON) -m pytest -n 2 tests

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks mutants


demo: venv
	$(PYTHON) train.py --demo

reproduce-cifar: venv
	MODELS="$(MODELS)" DATASETS="$(DATASETS)" OPTIMIZERS="$(OPTIMIZERS)" SPARSITIES="$(SPARSITIES)" \
	SEEDS="$(SEEDS)" DATA="$(DATA)" LAUNCH="$(LAUNCH)" EXTRA="$(EXTRA)" $(PYTHON) scripts/reproduce.py cifar

# ResNet-18 on CIFAR-10, SGD/SAM/SSAM-F/SSAM-D (+ tensor masks), SHORT_EPOCHS (15: an estimate of ~8 min on one
# H100) with bf16, channels-last, torch.compile; prints accuracy, ms/step, x SGD. DATA: ImageFolder or torchvision folder.
reproduce-cifar-short: venv
	OPTIMIZERS="$(OPTIMIZERS)" SEEDS="$(SEEDS)" DATA="$(DATA)" LAUNCH="$(LAUNCH)" EXTRA="$(EXTRA)" \
	SHORT_EPOCHS="$(SHORT_EPOCHS)" $(if $(SHORT_FLAGS),SHORT_FLAGS="$(SHORT_FLAGS)") $(PYTHON) scripts/reproduce.py cifar-short

reproduce-imagenet: venv
	@test -n "$(DATA)" || { echo "usage: make reproduce-imagenet DATA=/path/to/imagenet  (train/ and val/ inside)"; exit 2; }
	OPTIMIZERS="$(OPTIMIZERS)" SPARSITIES="$(SPARSITIES)" SEEDS="$(SEEDS)" DATA="$(DATA)" LAUNCH="$(LAUNCH)" \
	EXTRA="$(EXTRA)" $(PYTHON) scripts/reproduce.py imagenet

# Remake data/cifar10_subset.npz (byte-identical) from the JPEG release of CIFAR-10.
subset: venv
	@test -n "$(ARCHIVE)" || { echo "usage: make subset ARCHIVE=/path/to/cifar10-jpeg.tar.gz"; exit 2; }
	$(PYTHON) scripts/make_subset.py $(ARCHIVE)

# Step time of every method in bench/common.py (10 interleaved rounds), mask-update costs, optimizer memory ->
# bench/results/throughput.json. OMP_WAIT_POLICY=PASSIVE: libgomp's waiting threads sleep instead of spinning, which
# on a CPU shared with other jobs multiplied step times. GPU sizes:
#   make bench-throughput BENCH_ARGS="--bench-device cuda --bench-batch 128 --bench-width 512 --bench-rounds 20"
bench-throughput: venv
	mkdir -p bench/results
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest bench/ --benchmark-only --benchmark-json bench/results/throughput.json $(BENCH_ARGS)

# bench/results/throughput.json -> bench/results/throughput.md: ratios with 95% intervals, FLOP bounds, targets;
# the frontier's step table (frontier-throughput.json, its own run) appended
bench-report: venv
	$(PYTHON) bench/report.py bench/results/throughput.json -o bench/results/throughput.md \
	--also bench/results/frontier-throughput.json

# SGD, SAM, SSAM-F 0.5, SSAM-D 0.5/0.9 where the model fits its (label-noisy) training data, seeds 0-5, 10,000 test
# images: mean ± 95% CI, paired differences, Hessian lambda_1; then the two figures. Finished runs are reused.
# ACC_ARGS="--more": + SSAM-F 0.9/0.99, tensor masks, SAM-ON. Times: bench/README.md, "Accuracy".
# ACC_ARGS="--cheaper": + cost-aware masks and --ascent-fraction 0.25/0.5, each paired with its exact method.
bench-accuracy: venv
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) bench/accuracy.py $(ACC_ARGS)
	$(PYTHON) bench/plots.py bench/results/accuracy.json

# The frontier (bench/README.md "Frontier"): step time of its configurations (one throughput run, --bench-methods),
# then the accuracy screen (seeds 0-2), the confirmation of the candidates the screen picked (seeds 3-14) and
# the held-out check (seeds 15-20 on other training images, --data-seed 1):
# bench/results/frontier.{json,md,png}. Finished runs are reused; FRONTIER_ARGS="--runs-dir DIR --jobs N".
FRONTIER_BENCH := sgd,sam,ssamf-s0.5,ssamd-s0.5,ssamf-s0.9-tensor-cost,sam-f0.5,sam-f0.25,sam-k2,sam-k5,sam-k10
FRONTIER_BENCH := $(FRONTIER_BENCH),sam-k2-a0.7,sam-k5-a0.7,sam-k10-a0.7,sam-f0.5-k5-a0.7,sam-f0.25-k2-a0.7
FRONTIER_BENCH := $(FRONTIER_BENCH),ssamf-s0.9-tensor-cost-k2-a0.7,sam-k10-a0.1
bench-frontier-throughput: venv
	mkdir -p bench/results
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest bench/test_throughput.py::test_step --benchmark-only \
	--bench-methods $(FRONTIER_BENCH) --benchmark-json bench/results/frontier-throughput.json $(BENCH_ARGS)
	$(PYTHON) bench/frontier.py render
	$(MAKE) bench-report

bench-frontier: venv
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) bench/frontier.py screen $(FRONTIER_ARGS)
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) bench/frontier.py confirm $(FRONTIER_ARGS)
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) bench/frontier.py heldout $(FRONTIER_ARGS)

# Mutation testing of ssam.py: mutmut against its fast unit tests ([tool.mutmut] in pyproject.toml), one worker,
# niced; prints the score and each survivor, rewrites bench/results/mutation-survivors.md (reasons kept).
# About 10 min on the 2-core dev box with nothing else running (CONTRIBUTING.md). Not part of `make test`.
mutation: venv $(VENV)/.mutation
	nice -n 10 $(PYTHON) scripts/mutation.py
$(VENV)/.mutation: $(VENV)/.installed
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[mutation]"
	touch $@

# CUDA checks + the throughput benchmark at GPU sizes; prints "no CUDA device: skipped" without a GPU
gpu-check: venv
	$(PYTHON) bench/gpu_check.py
