"""Aggregator: ingest/resync, liveness, queries, command routing, metrics."""
