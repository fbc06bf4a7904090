"""Level 2: the volunteer's machine, and the peer as its good guest. Never imports ``garden.net``.

- ``capabilities``: cores, memory, GPU and load, and which roles this machine can take
- ``governor``: one place that says whether this peer may work now (pause, idle-only mode) and how fast
- ``cpu_budget``: ``--max-cpu``, a share of the machine for the peer's whole process tree
- ``idle``: ``--when idle``, work only while the owner does not need the machine
- ``disk``: ``--max-disk``, what may be pruned from the data dir and in which order
- ``memory``: ``--max-memory``, the one check that a model fits in the memory the peer may use
- ``contribution``: what this peer gave (rows, samples, tokens, hours), kept in the store
- ``logs``: one log format for every garden process, and the daemon's rotating log file
- ``loop_lag``: how late the daemon's event loop runs (``garden_event_loop_lag_seconds``)
"""
