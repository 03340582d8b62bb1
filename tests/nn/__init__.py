"""Tests of nn/: the network's symmetry, compiled and graphed forwards, precision."""
