"""End to end (`make test-e2e`, minutes): the embedded SmolLM2-135M, the demo as `make demo` runs it
and what each conversion init does to the real model; and the GPU check's DRY run
(bench/device_check.sh on a CPU). `make test` covers every part on tiny models and leaves these to
it; CI runs both."""
