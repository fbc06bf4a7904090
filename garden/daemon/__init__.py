"""Level 6: the daemon process: every service built in one place, started and stopped in order.

- ``gardener``: the Gardener, the composition root of one peer: every service built in one place
- ``supervisor``: starts the services in order, runs them, and closes them in the reverse order
- ``runner``: ``garden run`` from start to clean exit (signals, the data-dir lock, the HTTP socket)
- ``http_server``: uvicorn inside the daemon's event loop, on a socket bound beforehand
- ``datadir``: the data directory, its lock and runtime file
- ``service_unit``: the systemd unit, launchd plist and Task Scheduler line for ``garden service``
"""
