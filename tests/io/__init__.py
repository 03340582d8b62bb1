"""Tests of io/: checkpoints (files and structures are exercised through the CLI tests)."""
