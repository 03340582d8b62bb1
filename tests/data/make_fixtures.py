"""Make the small committed test fixtures from the real shared data.

Run from the repository root (needs ``../shared/data`` next to the repository)::

    python tests/data/make_fixtures.py

Writes, next to this script:

* ``nrel_sample_pairs.npz``: 16 real DFT pairs (<= 10 atoms, 6 chemical systems, 3 pairs or fewer
  each) of the NREL Zintl set (Pandey et al., Patterns 2, 100361 (2021), MIT), in the
  e3relax-pairs format;
* ``sevennet0_demo_sample.extxyz``: the first 4 pairs (8 frames) of the SevenNet-0 demo file,
  copied byte for byte;
* ``seeds/{perov_5,carbon_24}/val.csv.gz``: the first 3 rows of the shared seed files (Castelli et
  al. 2012 and AIRSS carbon, as distributed in the cdvae repository, MIT), columns unchanged;
* ``vasprun.xml``: a minimal vasprun.xml in VASP's layout holding one real NREL pair as the first
  and last ionic step (ASE's reader needs nothing more; ASE cannot write vasprun.xml).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from e3relax_ase.training.data.pairs import load_pairs, save_pairs  # noqa: E402
from e3relax_ase.training.data.splits import chemical_systems  # noqa: E402

CITATION = (
    "Pandey, Qu, Stevanovic, St. John, Gorai, Predicting energy and stability of known and hypothetical "
    "crystals using graph neural network, Patterns 2, 100361 (2021)"
)


def make_nrel_sample() -> Path:
    full = load_pairs(SHARED / "nrel_zintl_dft_pairs.npz")
    systems = np.array(chemical_systems(full))
    small = full.n_atoms <= 10
    rng = np.random.default_rng(0)
    candidates = sorted({s for s in systems[small] if (systems[small] == s).sum() >= 2})
    chosen = rng.choice(candidates, size=6, replace=False)
    picks = []
    for system in sorted(chosen):
        idx = np.flatnonzero(small & (systems == system))
        picks += sorted(rng.choice(idx, size=min(3, len(idx)), replace=False).tolist())
    sample = full.subset(np.array(picks[:16]))
    sample.metadata = {
        "source": "16 pairs of nrel_zintl_dft_pairs.npz (NREL Zintl DFT relaxations)",
        "teacher": "VASP PBE (NREL)",
        "licence": "MIT (prashungorai/combined-gnn)",
        "citation": CITATION,
    }
    return save_pairs(HERE / "nrel_sample_pairs.npz", sample)


def make_demo_sample(n_pairs: int = 4) -> Path:
    lines = (SHARED / "sevennet0_demo_pairs.extxyz").read_text().splitlines(keepends=True)
    out, i = [], 0
    for _ in range(2 * n_pairs):
        n = int(lines[i])
        out += lines[i : i + n + 2]
        i += n + 2
    path = HERE / "sevennet0_demo_sample.extxyz"
    path.write_text("".join(out))
    return path


def make_seed_samples(n_rows: int = 3) -> list:
    import csv
    import gzip

    paths = []
    for name in ("perov_5", "carbon_24"):
        with gzip.open(SHARED / "seeds" / name / "val.csv.gz", "rt", newline="") as f:
            reader = csv.reader(f)
            rows = [next(reader) for _ in range(n_rows + 1)]
        out = HERE / "seeds" / name / "val.csv.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        # mtime=0 keeps the gzip bytes reproducible.
        with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            import io

            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(rows)
            gz.write(text.getvalue().encode())
        paths.append(out)
    return paths


def _v(row) -> str:
    return "    <v>" + "".join(f" {x:16.8f}" for x in row) + " </v>\n"


def _structure(cell, frac, name=None) -> str:
    head = f' <structure name="{name}" >\n' if name else "  <structure>\n"
    text = head + '   <crystal>\n    <varray name="basis" >\n'
    text += "".join(_v(r) for r in cell)
    text += "    </varray>\n"
    text += f'    <i name="volume">  {abs(np.linalg.det(cell)):16.8f} </i>\n'
    text += '    <varray name="rec_basis" >\n' + "".join(_v(r) for r in np.linalg.inv(cell).T) + "    </varray>\n"
    text += '   </crystal>\n   <varray name="positions" >\n' + "".join(_v(r) for r in frac) + "   </varray>\n"
    return text + (" </structure>\n" if name else "  </structure>\n")


def _energy(total: float, indent: str) -> str:
    value = "NaN" if not np.isfinite(total) else f"{total:16.8f}"
    return (
        f"{indent}<energy>\n"
        f'{indent} <i name="e_fr_energy"> {value} </i>\n'
        f'{indent} <i name="e_wo_entrp"> {value} </i>\n'
        f'{indent} <i name="e_0_energy"> {value} </i>\n'
        f"{indent}</energy>\n"
    )


def make_vasprun(pair_index: int = 0) -> Path:
    from ase.data import chemical_symbols

    sample = load_pairs(HERE / "nrel_sample_pairs.npz")
    p = sample.pair(pair_index)
    symbols = [chemical_symbols[z] for z in p.numbers]
    types = list(dict.fromkeys(symbols))
    assert symbols == sorted(symbols, key=types.index), "VASP groups atoms by species"
    frac_u = np.linalg.solve(p.cell_unrelaxed.T, p.pos_unrelaxed.T).T  # [n, 3]
    frac_r = np.linalg.solve(p.cell_relaxed.T, p.pos_relaxed.T).T  # [n, 3]
    total = p.energy_per_atom_relaxed * len(symbols)
    text = '<?xml version="1.0" encoding="ISO-8859-1"?>\n'
    text += (
        f"<!-- Minimal test fixture in VASP's vasprun.xml layout, made by tests/data/make_fixtures.py from the "
        f"real NREL pair {p.id} (Pandey et al., Patterns 2, 100361 (2021), MIT): first ionic step = unrelaxed, "
        "last = relaxed with its DFT energy; the first step's energy is not known and is written as NaN. -->\n"
    )
    text += '<modeling>\n <generator>\n  <i name="program" type="string">vasp </i>\n </generator>\n'
    text += ' <incar>\n  <i name="IBRION">      2</i>\n  <i name="ISIF">      3</i>\n </incar>\n'
    text += (
        ' <kpoints>\n  <varray name="kpointlist" >\n    <v>       0.00000000       0.00000000       0.00000000 </v>\n'
        '  </varray>\n  <varray name="weights" >\n    <v>       1.00000000 </v>\n  </varray>\n </kpoints>\n'
    )
    text += f" <atominfo>\n  <atoms>{len(symbols):8d} </atoms>\n  <types>{len(types):8d} </types>\n"
    text += '  <array name="atoms" >\n   <dimension dim="1">ion</dimension>\n'
    text += '   <field type="string">element</field>\n   <field type="int">atomtype</field>\n   <set>\n'
    text += "".join(f"    <rc><c>{s:2s}</c><c>{types.index(s) + 1:4d}</c></rc>\n" for s in symbols)
    text += "   </set>\n  </array>\n </atominfo>\n"
    text += _structure(p.cell_unrelaxed, frac_u, "initialpos")
    for cell, frac, energy in ((p.cell_unrelaxed, frac_u, float("nan")), (p.cell_relaxed, frac_r, total)):
        text += " <calculation>\n  <scstep>\n" + _energy(energy, "   ") + "  </scstep>\n"
        text += _structure(cell, frac) + _energy(energy, "  ") + " </calculation>\n"
    text += _structure(p.cell_relaxed, frac_r, "finalpos") + "</modeling>\n"
    path = HERE / "vasprun.xml"
    path.write_text(text)
    return path


if __name__ == "__main__":
    for path in (make_nrel_sample(), make_demo_sample(), make_vasprun(), *make_seed_samples()):
        sys.stderr.write(f"wrote {path} ({path.stat().st_size} bytes)\n")
