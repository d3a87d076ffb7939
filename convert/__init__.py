"""The convert stage: `convert.run(ConvertOptions(...)) -> Conversion` (convert/stage.py)."""
from .options import ConvertOptions


def run(options: ConvertOptions):
    from .stage import run  # torch, safetensors and the models load with the first conversion, not the import

    return run(options)
