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

Field names: those of the batched crystal graph are the fields of
``e3relax_ase.geometry.graph.CrystalGraph``, those of prepared training pairs (``positions_target``,
``cell_target``, ...) the fields of ``e3relax_ase.training.train.dataset.PreparedPairs``: attributes,
which Python checks. The names spelled as strings, the arrays of a pair file, are declared below.
"""

# --- the training-pair file (``e3relax_ase.training.data.pairs``, docs/data.md) -----------------
# Array names of an e3relax-pairs npz (shapes and meaning in the pairs module's docstring).
# Pair files exist under these names: never change a value. ``training.data.pairs.PairSet`` has a
# field of the same name for each array but the two format tags.
PAIR_IDS = "ids"  # [n] str
PAIR_N_ATOMS = "n_atoms"  # [n] int64
PAIR_OFFSETS = "offsets"  # [n + 1] int64
PAIR_NUMBERS = "numbers"  # [N] int64
PAIR_POS_UNRELAXED = "pos_unrelaxed"  # [N, 3] float64, Å
PAIR_POS_RELAXED = "pos_relaxed"  # [N, 3] float64, Å
PAIR_CELL_UNRELAXED = "cell_unrelaxed"  # [n, 3, 3] float64, Å
PAIR_CELL_RELAXED = "cell_relaxed"  # [n, 3, 3] float64, Å
PAIR_PBC = "pbc"  # [n, 3] bool, optional
PAIR_ENERGY_PER_ATOM_RELAXED = "energy_per_atom_relaxed"  # [n] float64, optional
PAIR_FORMAT = "format"  # [] str, optional
PAIR_FORMAT_VERSION = "format_version"  # [] int64, optional
PAIR_METADATA = "metadata"  # [] str (JSON), optional
PAIR_INFO = "info"  # [] str (JSON), optional
# A file without one of these is not a pair file.
PAIR_REQUIRED = (
    PAIR_IDS,
    PAIR_N_ATOMS,
    PAIR_OFFSETS,
    PAIR_NUMBERS,
    PAIR_POS_UNRELAXED,
    PAIR_POS_RELAXED,
    PAIR_CELL_UNRELAXED,
    PAIR_CELL_RELAXED,
)

# --- sanity limits -----------------------------------------------------------------------
# Å | no two atoms (nor an atom and its own periodic image) closer: the shortest real bond, H2's,
# is 0.74 Å, so a closer pair is a broken input, a collapsed prediction or a failed teacher
# relaxation. Inputs are refused (geometry.validation), predictions flagged (relax.sanity),
# generated starts redrawn and distilled pairs dropped (training).
MIN_DISTANCE = 0.5
# relaxed (or predicted) / input volume: a relaxation that more than halves or doubles a
# crystal's volume has broken it, not relaxed it. Predictions outside are flagged
# (relax.sanity), teacher results outside dropped (training.distill.distill, training.distill.batched_relax).
VOLUME_RATIO_RANGE = (0.5, 2.0)

# Default graph and numerical constants (the model config holds the ones that are
# hyperparameters; these are conventions shared by data and model code).
SHELL_TOLERANCE = 1e-4  # Å | neighbours within this of the K-th distance count as the K-th shell
# Å | a neighbour this close to the cutoff carries an envelope weight below 2e-7 (p = 5, D = 6):
# it counts as absent when deciding that an atom is isolated or that a gap is vacuum, so that a
# distance of exactly the cutoff (a 6 Å cubic cell) gets the same verdict whatever rounding a
# rotation or another basis adds. The decision still flips at cutoff - margin, a number no
# natural input sits on within rounding.
ISOLATION_MARGIN = 0.01
