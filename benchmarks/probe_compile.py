"""Does torch.compile of the paper-size network work on CUDA, and what does it buy (TF32)?

Times the untrained F = 512, T = 4 network's forward pass on batches of 1,024, 2,048 and 1,000 NREL
inputs: eager, with each layer's message passing compiled (what ``OneShotRelaxer(compile=True)``
does), and with the whole network compiled; the first call includes the compilation. Prints the
table and each compiled pass's largest atom deviation from the eager one. CUDA only.

    python benchmarks/probe_compile.py

Output of the fifth session's run: benchmarks/results/compile_probe_h200_session5.txt.
"""

import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import batch_graph, test_structures

from e3relax_ase.config import ModelConfig
from e3relax_ase.nn.model import E3RelaxH2
from e3relax_ase.nn.precision import matmul_precision

device = torch.device("cuda")
torch.manual_seed(0)
model = E3RelaxH2(ModelConfig()).to(device).eval()
crystals = test_structures(2048)
graphs = {n: batch_graph(crystals[:n], model.config, device) for n in (1024, 2048)}
graphs[1000] = batch_graph(crystals[1000:2000], model.config, device)


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    best = 1e9
    for _ in range(repeats):
        s = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - s)
    return best


def run(label, network):
    out = {}
    with torch.inference_mode(), matmul_precision("tf32", device):
        for n, g in graphs.items():
            try:
                s = time.perf_counter()
                network(g)
                torch.cuda.synchronize()
                first = time.perf_counter() - s
                t = timed(lambda g=g: network(g))
                out[n] = network(g)
                print(
                    f"{label:28s} batch {n:5d}: {g.n_graphs / t:8.0f} structures/s ({t * 1e3:.1f} ms; first call {first:.1f} s); peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",  # noqa: E501
                    flush=True,
                )
            except Exception as exc:
                print(f"{label} batch {n}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                traceback.print_exc(limit=3)
                return out
    return out


eager = run("eager tf32", model)
for name, make in (("compile mp dynamic", "mp"), ("compile model dynamic", "model")):
    try:
        torch._dynamo.reset()
        if make == "model":
            network = torch.compile(model, dynamic=True)
        else:
            import copy

            network = copy.deepcopy(model)
            for layer in network.layers:
                layer.message_passing = torch.compile(layer.message_passing, dynamic=True)
        got = run(name, network)
        for n in got:
            dev = (got[n].positions - eager[n].positions).norm(dim=-1).max().item()
            print(f"  {name} batch {n}: largest atom deviation from eager tf32 {dev:.2e} Å", flush=True)
    except Exception as exc:
        print(name, "FAILED", type(exc).__name__, str(exc)[:400], flush=True)
