"""One-shot relaxation, then refinement with real forces (ASE's EMT) until fmax < 0.02 eV/Å.

Two ways: `relax(..., refine=calculator)`, and the drop-in ASE optimizer
`OneShotThenOptimize`, which jumps to the prediction before its first force call.

    python examples/relax_refine_emt.py [OUTPUT_DIR]
"""

import ase.io
from _common import output_dir
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter

from e3relax_ase import OneShotRelaxer
from e3relax_ase.relax.optimizer import OneShotThenOptimize

out = output_dir()
copper = bulk("Cu", "fcc", a=3.75, cubic=True) * (2, 2, 2)  # 4 % too large
copper.rattle(0.05, seed=2)
relaxer = OneShotRelaxer()

relaxed = relaxer.relax(copper, refine=EMT(), fmax=0.02, trajectory=str(out / "refine.traj"))
print(
    f"refine: converged={relaxed.info['e3relax_converged']} after {relaxed.info['e3relax_nsteps']} steps, "
    f"fmax {relaxed.info['e3relax_fmax']:.4f} eV/Å, a = {relaxed.cell.lengths()[0] / 2:.3f} Å (EMT: 3.590)"
)
ase.io.write(out / "Cu_relaxed.extxyz", relaxed)

atoms = copper.copy()
atoms.calc = EMT()
optimizer = OneShotThenOptimize(FrechetCellFilter(atoms), optimizer="FIRE", relaxer=relaxer, logfile=None)
converged = optimizer.run(fmax=0.02, steps=500)
print(f"OneShotThenOptimize: converged={converged} after {optimizer.nsteps} steps")
print("trajectory (open with `ase gui`):", out / "refine.traj")
