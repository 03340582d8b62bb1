"""Building blocks of E3Relax-H2. Pure tensor functions of a batched graph: no IO, no ASE."""
