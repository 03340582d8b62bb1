"""Tests of The product as users meet it: layering, shipped checkpoint, examples, benchmarks, fuzzing."""
