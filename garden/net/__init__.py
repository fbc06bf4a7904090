"""Level 2: the swarm over hivemind, with no knowledge of missions. Never imports ``garden.host``.

- ``swarm``: the hivemind DHT in its own process (with its ``p2pd``), and bounded, counted access to it
  from the daemon's event loop
- ``identity``: the peer's persistent libp2p key, so its peer id survives restarts
- ``directory``: the swarm's phone book: this peer's signed ``PeerInfo`` announced, the others' read
- ``transfer``: chunked, size-capped, hash-verified fetches and offers of content between peers (files
  streamed from disk to disk)
- ``rate_limit``: the token bucket behind ``--max-upload-rate`` and ``--max-download-rate``
- ``budget``: the bytes held at once for peers' fetches, ``--max-serving-memory``
"""
