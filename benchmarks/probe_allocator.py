"""Does the CUDA caching allocator cost the relaxing process's main thread? Throughput, main-thread
CPU and cudaMalloc / cudaFree calls of relax_many(num_workers=14) on 16,384 NREL inputs, shipped
model, TF32, twice in steady state. CUDA only; run it with and without
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, and with the argument ``compile``:

    python benchmarks/probe_allocator.py [compile]

Output of the fifth session's run: benchmarks/results/allocator_probe_h200_session5.txt.
"""

import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
logging.disable(logging.WARNING)
from ase import Atoms
from bench_inference import test_structures

from e3relax_ase.relax.relaxer import OneShotRelaxer

compile_ = "compile" in sys.argv
crystals = test_structures(1024)
atoms = [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in (crystals[i % 1024] for i in range(16384))]
r = OneShotRelaxer("default", device="cuda", dtype="float32", precision="tf32", compile=compile_)
r.relax_many(atoms[:3000], num_workers=14, errors="return")
for _ in range(2):
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    s, c = time.perf_counter(), time.thread_time()
    r.relax_many(atoms, num_workers=14, errors="return")
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - s, time.thread_time() - c
    after = torch.cuda.memory_stats()
    mallocs = after.get("segment.all.allocated", 0) - before.get("segment.all.allocated", 0)
    frees = after.get("segment.all.freed", 0) - before.get("segment.all.freed", 0)
    print(
        f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF', 'default'):32s} compile={compile_} {len(atoms) / wall:7.0f}/s main cpu {cpu / len(atoms) * 1e6:5.0f} us, "
        f"cudaMalloc {mallocs}, cudaFree {frees}, retries {after.get('num_alloc_retries', 0)}",
        flush=True,
    )
r.close()
