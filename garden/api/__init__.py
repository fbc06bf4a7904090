"""Level 7: the local HTTP port. Reads the Gardener's services; only this package maps errors to HTTP codes.

- ``app``: the FastAPI app: ``/status``, ``/peers``, error shapes
- ``models``: ``/models`` (served layers and published students) and ``/models/pull``
- ``guard``: the port answers only its owner (Host check, no state changes from other origins, the token)
- ``limits``: the cap on request bodies (413)
- ``missions``: ``/missions`` (launch, list, inspect, export, pull, promote, cancel)
- ``openai``: ``/v1``, the OpenAI-compatible part, with ``/v1/feedback``
- ``feedback``: ``/feedback``: the answers kept for rating, the pairs, the prompts for the next mission
- ``control``: the owner's ``/pause``, ``/resume`` and ``/contribution``
- ``metrics``: Prometheus ``/metrics``, collected at scrape time
- ``dashboard``: the page at ``/`` and its files
- ``schemas``: the response bodies, a public contract
"""
