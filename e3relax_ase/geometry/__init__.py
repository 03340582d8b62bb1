"""Geometry of crystals, without a network or a file: lattice reduction (``niggli``), the
canonical form the network sees (``canonical``), neighbour graphs (``graph``), input checks
(``validation``) and vacuum detection (``vacuum``). Imports only ``keys`` and ``config``."""
