"""Serving benchmark client: workloads, load generation, latency statistics."""
