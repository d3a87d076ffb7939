"""The vLLM serving tests run only where vLLM is installed: `make test-serve` (its own .venv-serve,
since vLLM's CPU build pins transformers<5.20). In .venv they are not collected."""
import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]
