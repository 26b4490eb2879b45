"""Integrations with other projects (each imported lazily, on request)."""
