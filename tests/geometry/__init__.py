"""Tests of geometry/: Niggli, canonical form, graph, validation, vacuum."""
