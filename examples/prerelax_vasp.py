"""Pre-relax a magnetic slab with fixed bottom layers, then write VASP inputs with pymatgen.

The magnetic moments and the FixAtoms constraint survive the one-shot relaxation; pymatgen's
AseAtomsAdaptor turns them into the `magmom` and `selective_dynamics` site properties, which
MPRelaxSet writes as MAGMOM (INCAR) and selective dynamics (POSCAR).

    python examples/prerelax_vasp.py [OUTPUT_DIR]
"""

import numpy as np
from _common import output_dir
from ase.build import fcc111
from ase.constraints import FixAtoms
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.vasp.sets import MPRelaxSet

from e3relax_ase import OneShotRelaxer

out = output_dir()
slab = fcc111("Ni", size=(2, 2, 4), vacuum=7.5)
slab.set_constraint(FixAtoms(mask=slab.positions[:, 2] < slab.positions[:, 2].min() + 2.5))  # two bottom layers
slab.set_initial_magnetic_moments(np.full(len(slab), 0.6))
slab.rattle(0.05, seed=0)

# Slabs keep their cell in-plane too here (relax_cell=False); the vacuum axis is never stretched.
prerelaxed = OneShotRelaxer().relax(slab, relax_cell=False)
structure = AseAtomsAdaptor.get_structure(prerelaxed)

# potcar_spec=True writes POTCAR.spec (the POTCAR symbols) so no VASP pseudopotentials are needed here.
MPRelaxSet(structure, user_incar_settings={"ISIF": 2, "ISMEAR": 1, "SIGMA": 0.1}).write_input(out / "vasp", potcar_spec=True)
print((out / "vasp" / "INCAR").read_text().split("MAGMOM")[1].splitlines()[0].strip(" ="))
print("selective dynamics in POSCAR:", "Selective dynamics" in (out / "vasp" / "POSCAR").read_text())
print("VASP inputs in", out / "vasp")
