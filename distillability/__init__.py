"""distillability: measure and control how well a teacher language model can be distilled.

Implements "Distillation Traps and Guards: A Calibration Knob for LLM Distillability"
(arXiv 2604.18963): diagnose the traps, calibrate a teacher with an RL knob eta, distill students,
and evaluate teachers and students.
"""

__version__ = "0.1.0"
