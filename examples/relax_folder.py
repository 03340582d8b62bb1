"""Relax every structure file in a folder (CIF, POSCAR, multi-frame extxyz) in batches.

The same from the shell:  e3relax-ase relax examples/data/folder -o OUTPUT_DIR --json

    python examples/relax_folder.py [OUTPUT_DIR]
"""

import ase.io
from _common import DATA, output_dir

from e3relax_ase import OneShotRelaxer
from e3relax_ase.io.files import expand_inputs, read_structures

out = output_dir()
structures, names = [], []
for path in expand_inputs([DATA / "folder"]):
    for index, atoms in enumerate(read_structures(path)):
        structures.append(atoms)
        names.append(f"{path.name}@{index}")

relaxer = OneShotRelaxer()
# errors="return": a structure that fails comes back as a RelaxFailure, the others still relax.
results = relaxer.relax_many(structures, names=names, errors="return")
good = []
for name, result in zip(names, results):
    if isinstance(result, ase.Atoms):
        good.append(result)
        print(f"{name:32s} ok   sane={result.info['e3relax_sane']}  moved {result.info['e3relax_max_displacement']:.3f} Å")
    else:
        print(f"{name:32s} FAILED {result.message}")
ase.io.write(out / "relaxed.extxyz", good)
print(f"{len(good)} structures written to", out / "relaxed.extxyz")
