"""How the provenance keys (``atoms.info["e3relax_*"]``) are carried in each file format we write.

* extxyz: every key is a comment-line ``key=value`` pair. ASE writes an empty string as a bare
  ``key=``, which its reader takes for part of the next pair (``e3relax_problems=""`` read back
  as the text of the key after it, which was lost). Empty strings are therefore left out of an
  extxyz frame: a missing ``e3relax_problems`` means no problems. Everything else reads back
  with its value and type.
* traj: keeps ``info`` as it is.
* cif: ``info`` has no place in a CIF, so the keys go into a comment block at the top of the file,
  one ``# key = JSON value`` line each (:func:`cif_provenance_block`); :func:`read_cif_provenance`
  reads them back, with their types.
* vasp (POSCAR): the keys that identify a result (model, checkpoint, version, source) go on the
  free-text first line.
* db, json: ASE's writers drop ``info``; the format-loss warning says so.
"""

from __future__ import annotations

import json

import numpy as np

from e3relax_ase.io.structures import INFO_INDEX, INFO_MODEL, INFO_PREFIX, INFO_SHA256, INFO_SOURCE, INFO_VERSION

CIF_MARK = "# e3relax-ase provenance"  # first line of the comment block
POSCAR_KEYS = (INFO_MODEL, INFO_SHA256, INFO_VERSION, INFO_SOURCE, INFO_INDEX)  # what identifies a result


def provenance(info: dict) -> dict:
    """The ``e3relax_*`` keys of an ``info`` dict, their values as plain Python types."""
    return {key: _plain(value) for key, value in info.items() if str(key).startswith(INFO_PREFIX)}


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return value


def for_extxyz(atoms):
    """``atoms`` as it should go to an extxyz writer: a shallow copy without empty-string info
    values (see the module docstring); ``atoms`` itself when it has none."""
    empty = [key for key, value in atoms.info.items() if isinstance(value, str) and value == ""]
    if not empty:
        return atoms
    copy = atoms.copy()
    copy.calc = atoms.calc  # forces and stress of a refinement are written too
    for key in empty:
        del copy.info[key]
    return copy


def cif_provenance_block(info: dict) -> str:
    """The comment block that opens a CIF we write: one ``# key = JSON value`` line per key."""
    keys = provenance(info)
    if not keys:
        return ""
    lines = [CIF_MARK]
    lines += [f"# {key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def read_cif_provenance(text: str) -> dict:
    """The keys of the provenance block of a CIF's text (empty when it has none)."""
    found = {}
    inside = False
    for line in text.splitlines():
        if line.strip() == CIF_MARK:
            inside = True
            continue
        if not inside:
            continue
        if not line.startswith("# ") or " = " not in line:
            break
        key, value = line[2:].split(" = ", 1)
        found[key.strip()] = json.loads(value)
    return found


def poscar_comment(atoms) -> str:
    """The free-text first line of a POSCAR: the formula, then the identifying keys."""
    keys = provenance(atoms.info)
    parts = [f"{key[len(INFO_PREFIX) :]}={keys[key]}" for key in POSCAR_KEYS if key in keys]
    head = atoms.get_chemical_formula()
    return f"{head} | e3relax {' '.join(parts)}" if parts else head
