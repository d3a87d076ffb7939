"""vLLM plugin entry point (pyproject.toml: ``vllm.general_plugins``): vLLM calls ``register`` in
every process it starts, so a converted folder (``architectures: ["SharedKVForCausalLM"]``) loads
with ``LLM(model=folder)`` or ``vllm serve folder`` once the project is installed."""

ARCHITECTURE = "SharedKVForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    # by name: the model code (and torch) is imported only when a converted checkpoint is loaded
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "serve.vllm_model:SharedKVForCausalLM")
