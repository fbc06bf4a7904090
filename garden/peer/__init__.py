"""Swarm membership: DHT start/join, identity, peer records, capability probe."""
