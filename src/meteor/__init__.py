"""METEOR as a reproducible DVC pipeline: the library behind the thin scripts in ``stages/``."""

__version__ = "0.1.0"
