"""Tests of training/: pairs, importers, splits, input generators, distillation, the trainer."""
