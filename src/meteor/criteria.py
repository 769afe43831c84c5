"""METEOR's five judge criteria: what the judge scores an answer on and compares two answers by.

The single definition of the list; everything that needs the default criteria imports it from here.
"""

from __future__ import annotations

CRITERIA = ("accuracy", "completeness", "relevance", "coherence", "reliability")
