"""Real garden processes on 127.0.0.1 for tests and benchmarks, and the machine they ran on.

Both ``tests/`` and ``benchmarks/`` import this package from a checkout (the benchmarks put the repository
root on ``sys.path``). It is not part of the installed ``garden`` package: ``pyproject.toml`` packages
``garden*`` only.

- ``daemons``: ``garden run`` daemons (``DaemonFactory``, ``Daemon``) with their descendants tracked by PID
  (``TrackedProcess``), so that all are stopped at the end and any that outlives its parent is seen;
  ``wait_until`` polls for a condition.
- ``trainers``: collaborative trainer workers (``WorkerFactory``), a tiny random student (``make_tiny_student``)
  and a store of rows shaken from the built-in teacher (``make_rows_store``, mission ``MISSION``).
- ``processes``: CPU seconds of a process and its descendants (``process_tree``, ``cpu_seconds``).
- ``machine``: the machine a benchmark ran on, with the load before and after the run (``MachineReport``).
"""
