"""METEOR as a reproducible DVC pipeline: the library behind the thin scripts in ``stages/``.

Importing any ``meteor`` module first pins the CPU kernels (:mod:`meteor.kernels`), so every entry
point gets the same floating-point bits on any x86-64 machine.
"""

from meteor.kernels import pin_environment

pin_environment()

__version__ = "0.1.0"
