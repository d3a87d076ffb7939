"""Every reader and writer of what the stages exchange: the stages meet here, through files, and never
through each other's modules.

* ``source``: a checkpoint's tensors by name (a folder of safetensors shards, or a GGUF), with one
  scan that hashes the files and feeds the copies;
* ``writer``: the streaming shard writer (convert's output, uptrain's exports);
* ``dtypes``: the one dtype map (safetensors and torch names) and raw-byte casts;
* ``conversion``: ``Conversion.load(folder)``, a converted folder's conversion.json, typed;
* ``run_folder``: ``RunFolder(path)``, an uptraining run's folder: its recipe, metrics, exports.

Loading a whole model through transformers (HF folders, GGUF dequantized once into a cache) is
``common.sources``'.
"""
from .conversion import MANIFEST, Conversion
from .run_folder import RunFolder, control_folder

__all__ = ["MANIFEST", "Conversion", "RunFolder", "control_folder"]
