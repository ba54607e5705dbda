"""Diagnosis: detectors that read the live metric store and explain, in plain words, what is going wrong.

One detector per file, each a small class with a docstring citing its heuristic; ``Diagnoser`` runs them
on schedule and keeps one alert per episode; ``data_checks`` runs before the first step.
"""
from .alert import KINDS, SEVERITIES, Action, Alert
from .base import Detector, Signals
from .dead_units import ActivationProbe
from .diagnoser import DETECTORS, Diagnoser, default_detectors

__all__ = ["KINDS", "SEVERITIES", "Action", "Alert", "Detector", "Signals", "DETECTORS", "ActivationProbe",
           "Diagnoser", "default_detectors"]
