"""The uptrain stage: `uptrain.run(Recipe(...)) -> Run` (uptrain/stage.py)."""
from .recipe import Recipe


def run(recipe: Recipe, resume: bool = False, resume_from: str | None = None):
    from .stage import run  # torch and DeepSpeed load with the first run, not the import

    return run(recipe, resume, resume_from)
