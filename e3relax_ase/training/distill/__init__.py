"""Distillation: inputs generated or perturbed, relaxed by a teacher in batches, kept as pairs."""
