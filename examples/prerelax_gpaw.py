"""Pre-relax silicon in one shot, then write a GPAW script that finishes the job with DFT.

GPAW is not needed to run this example: it writes `si_prerelaxed.traj` and `gpaw_relax.py`;
run the latter where GPAW is installed (`python gpaw_relax.py`).

    python examples/prerelax_gpaw.py [OUTPUT_DIR]
"""

import ase.io
from _common import output_dir
from ase.build import bulk

from e3relax_ase import OneShotRelaxer

out = output_dir()
silicon = bulk("Si", "diamond", a=5.60)  # 3 % too large
silicon.rattle(0.03, seed=1)

prerelaxed = OneShotRelaxer().relax(silicon)
ase.io.write(out / "si_prerelaxed.traj", prerelaxed)

SCRIPT = '''"""Finish the relaxation of the one-shot pre-relaxed silicon with GPAW (plane waves, PBE)."""
import ase.io
from ase.optimize import BFGS
from gpaw import GPAW, PW

try:  # ASE >= 3.23
    from ase.filters import FrechetCellFilter as CellFilter
except ImportError:  # older ASE (e.g. Debian's GPAW 22.8 build)
    from ase.constraints import ExpCellFilter as CellFilter

atoms = ase.io.read("si_prerelaxed.traj")
atoms.calc = GPAW(mode=PW(300), xc="PBE", kpts=(4, 4, 4), txt="gpaw.txt")
BFGS(CellFilter(atoms), trajectory="gpaw_relax.traj").run(fmax=0.02)
ase.io.write("si_relaxed.cif", atoms)
print("energy", atoms.get_potential_energy(), "eV; volume", atoms.get_volume(), "Å^3")
'''
(out / "gpaw_relax.py").write_text(SCRIPT)
print(f"volume {silicon.get_volume():.2f} -> {prerelaxed.get_volume():.2f} Å^3")
print("wrote", out / "si_prerelaxed.traj", "and", out / "gpaw_relax.py")
