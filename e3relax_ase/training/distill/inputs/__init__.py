"""Generators of user-like inputs for distillation, one concept per module.

* :mod:`.chemistry`: the elements to cover, element similarity, charge-balanced and
  intermetallic compositions;
* :mod:`.spacegroups`: space groups from spglib's operations and their Wyckoff positions;
* :mod:`.wyckoff`: random symmetric crystals from space-group operations and Wyckoff orbits;
* :mod:`.prototypes`: known prototypes re-decorated with 3-4 chemically similar elements;
* :mod:`.layered`: slabs, layered cells and MX2 sheets with vacuum along one axis (pbc kept);
* :mod:`.supercells`: 2x1x1 ... 2x2x2 supercells of small cells;
* :mod:`.starts`: harder starting points (volume off by up to +-35 %, shear, large rattles);
* :mod:`.plan`: the driver: a seeded mix of generators with element and size quotas, written
  as the compact inputs file that ``scripts/distill_gpu.py relax`` reads (:mod:`.input_set`:
  the file, its sidecar and manifest, the set's summary and planned splits).

Every generator is a pure function of a ``numpy.random.Generator`` and returns an
``ase.Atoms`` with ``info["generator"]`` = its name and parameters (JSON-able), or None when
the draw did not give a valid crystal (the driver draws again from the same generator).
"""
