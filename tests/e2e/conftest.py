"""The embedded SmolLM2-135M end to end (`make test-e2e`, minutes): the demo as `make demo` runs it,
and what each conversion init does to the real model. `make test` covers every part on tiny models
and leaves these to it; CI runs both."""
