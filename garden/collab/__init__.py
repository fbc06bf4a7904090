"""Level 4: training one student across the swarm with hivemind.

- ``worker``: the trainer worker process (``python -m garden.collab.worker CONFIG.json``), one per mission a
  peer trains; its typed config and status files
- ``trainer``: one peer's share of collaborative DORPO training around ``hivemind.Optimizer``
- ``compression``: 8-bit compression of averaged tensors that works with numpy 2
- ``hivemind_patches``: every patch of hivemind's internals, in one module, refused on a hivemind release
  it was not written for
- ``robust``: the rules by which what other peers claim counts (bounded weights, CenteredClip, credible epochs,
  agreed states), as pure functions
- ``robust_hivemind``: those rules at work inside hivemind's reducer, progress tracker and state download
"""
