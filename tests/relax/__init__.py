"""Tests of relax/: OneShotRelaxer, its pipeline, workers, sanity checks, refinement."""
