"""Workloads outside ARWGAN that the engine tunes (docs/library.md)."""
