"""Level 1: models on this machine, with no training.

- ``loading``: model references (hub ids, local directories, ``.gguf`` files, ``builtin:`` models, run
  directories), the GGUF conversion, loading with a per-process cache, unloading, memory and disk estimates
- ``cache``: where models live (a daemon's in its data dir, counted toward ``--max-disk``), which hub models
  are downloaded, and how big they are on disk
- ``hub``: what the hub's metadata says of a model's size, asked before any download
- ``convert``: ``python -m garden.models.convert``, a GGUF conversion in a process of its own
- ``student``: a student built from a reference, pruned to every n-th decoder layer, optionally with LoRA
- ``chat``: how text becomes model input everywhere (chat prompt, answer tokens, padding), so a student is
  asked exactly as its teacher was
"""
