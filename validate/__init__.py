"""The validate stage: `validate.run(ValidateOptions(...)) -> Report` (validate/stage.py)."""
from .options import ValidateOptions


def run(options: ValidateOptions):
    from .stage import run  # torch and the models load with the first validation, not the import

    return run(options)
