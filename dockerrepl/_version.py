"""The version: a literal, so that vendoring tools and setup.cfg find it without importing."""

__version__ = "0.1.0"
