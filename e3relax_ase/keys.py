"""Conventions of the whole package, declared once.

Units: lengths in Å, energies in eV, pressures in eV/Å^3 inside Python (GPa only on the CLI).

Cell convention: a cell is a [3, 3] array whose ROWS are the lattice vectors l_1, l_2, l_3
(ASE's convention). A batch of cells is [n_graphs, 3, 3]. Fractional coordinates f and
Cartesian positions r are related by r = f @ cell. A lattice-vector update for axis c is
written into ROW c of the cell, never into column c (the authors' public code does the latter,
which breaks rotation equivariance).

Edge convention: an edge (src = j, dst = i, shift = k) carries a message from the periodic
image of atom j translated by k @ cell to atom i. Its vector is
    edge_vec = positions[j] + k @ cell - positions[i]        # [n_edges, 3], Å
i.e. it points from the receiving atom i to the sending image of j. The true self pair
(i == j, k == 0) never appears; an atom's own periodic images within the cutoff do.

Field names of a batched crystal graph (see ``e3relax_ase.geometry.graph.CrystalGraph``):
"""

# --- per atom ---------------------------------------------------------------------------
NUMBERS = "numbers"  # [n_atoms] int64 | atomic numbers
POSITIONS = "positions"  # [n_atoms, 3] float | Cartesian positions, Å
BATCH = "batch"  # [n_atoms] int64 | index of the crystal each atom belongs to

# --- per crystal ------------------------------------------------------------------------
CELL = "cell"  # [n_graphs, 3, 3] float | rows are lattice vectors, Å
PBC = "pbc"  # [n_graphs, 3] bool | periodic along each lattice vector
N_ATOMS = "n_atoms"  # [n_graphs] int64 | atoms per crystal

# --- per edge ---------------------------------------------------------------------------
EDGE_SRC = "edge_src"  # [n_edges] int64 | sending atom j (global index)
EDGE_DST = "edge_dst"  # [n_edges] int64 | receiving atom i (global index)
EDGE_SHIFT = "edge_shift"  # [n_edges, 3] float | integer lattice translation k of the sender

# --- training pairs ---------------------------------------------------------------------
POSITIONS_TARGET = "positions_target"  # [n_atoms, 3] float | relaxed positions, Å
CELL_TARGET = "cell_target"  # [n_graphs, 3, 3] float | relaxed cell, Å

# Default graph and numerical constants (the model config holds the ones that are
# hyperparameters; these are conventions shared by data and model code).
SHELL_TOLERANCE = 1e-4  # Å | neighbours within this of the K-th distance count as the K-th shell
# Å | a neighbour this close to the cutoff carries an envelope weight below 2e-7 (p = 5, D = 6):
# it counts as absent when deciding that an atom is isolated or that a gap is vacuum, so that a
# distance of exactly the cutoff (a 6 Å cubic cell) gets the same verdict whatever rounding a
# rotation or another basis adds. The decision still flips at cutoff - margin, a number no
# natural input sits on within rounding.
ISOLATION_MARGIN = 0.01
