"""Level 1: models on this machine, with no network and no training.

- ``loading``: model references (hub ids, local directories, ``.gguf`` files, ``builtin:`` models, run
  directories), the GGUF conversion cache, loading with a per-process cache, unloading, memory estimates
- ``student``: a student built from a reference, pruned to every n-th decoder layer, optionally with LoRA
- ``chat``: how text becomes model input everywhere (chat prompt, answer tokens, padding), so a student is
  asked exactly as its teacher was
"""
