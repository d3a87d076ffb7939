"""validate's optional checks (validate/check.py's protocol), in the order the report shows them: the
behaviour rows and line beside perplexity, then the tasks and passkey sections."""
from __future__ import annotations

from . import behaviour, passkey, tasks
from .check import Check

CHECKS: tuple[type[Check], ...] = (behaviour.Check, tasks.Tasks, passkey.Passkey)
