"""Level 3: layer-range serving and pipelined generation across peers. Never imports ``garden.distill``.

- ``blocks``: a contiguous range of a model's decoder layers with a KV cache per session, and the two ends
  (embeddings; final norm and LM head) that stay with the generating peer
- ``server``: serving a range to the swarm (the ``server`` role): sessions, caps, announcements
- ``route``: the shortest chain of servers that covers a model's layers, ranked by what this client measured
- ``client``: pipelined generation through a chain, with fail-over and replay when a server dies, and spot
  checks of servers' hidden states against a second server of the same layers
- ``generate``: local generation with one loaded model, streamed
- ``service``: what the daemon runs for inference: its block servers and the generators behind ``/v1``
"""
