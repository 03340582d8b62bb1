"""Tests of cli/: the e3relax-ase command, one process and under torchrun."""
