"""Serving converted checkpoints with vLLM (an out-of-tree model plugin; see plugin.py)."""
