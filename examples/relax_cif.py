"""Relax a CIF in one shot; write extxyz (keeps provenance) and a symmetrised CIF.

python examples/relax_cif.py [OUTPUT_DIR]
"""

import ase.io
from _common import DATA, output_dir
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter

from e3relax_ase import OneShotRelaxer

out = output_dir()
atoms = ase.io.read(DATA / "NaCl_strained.cif")

relaxer = OneShotRelaxer()  # the "default" checkpoint, on a GPU when there is one
relaxed = relaxer.relax(atoms)  # a new Atoms; `atoms` is untouched

print(f"volume {atoms.get_volume():.2f} -> {relaxed.get_volume():.2f} Å^3")
for key in ("e3relax_model", "e3relax_max_displacement", "e3relax_sane", "e3relax_refine_advised"):
    print(f"  {key:28s} {relaxed.info[key]}")
ase.io.write(out / "NaCl_relaxed.extxyz", relaxed)  # extxyz keeps info, magmoms, FixAtoms

# pymatgen in, pymatgen out; CifWriter(symprec=...) writes the symmetric cell, not P1.
structure = relaxer.relax(Structure.from_file(DATA / "NaCl_strained.cif"))
CifWriter(structure, symprec=0.1).write_file(out / "NaCl_relaxed.cif")
print("written to", out)
