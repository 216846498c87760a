"""Where the CUDA SAE step's time goes at SmolLM2's width, beside sparsify's (the script behind
sae_profile.log; run from the repository root with src/ on PYTHONPATH, the wheels of gpu_session.sh
installed). ``ours-old`` is our trainer with the dead-latent counter as it was before it became
sync-free. ``DEV=cpu`` runs it at a toy size on the CPU, to check the script itself."""

import os
import sys
import time
import types
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
import sae_throughput as st  # noqa: E402

DEV = os.environ.get("DEV", "cuda")
st.DEVICE = torch.device(DEV)
d, m, k, b = (576, 9216, 32, 4096) if DEV == "cuda" else (64, 512, 8, 256)
data = st.Synthetic(d, 4 * m)
xs = [data.batch(i, b).to(DEV) for i in range(8)]


def _old_update_dead(self, out, n_tokens):  # the code before the sync-free version
    fired = torch.zeros(self.plan.d_sae, dtype=torch.bool, device=self.device)
    fired[out.top_indices[out.top_acts > 0]] = True
    self.since_fired += n_tokens
    self.since_fired[fired] = 0


old = st.Ours(d, m, k, b, 2000, 100)
old.name = "ours-old"
old.trainer._update_dead = types.MethodType(_old_update_dead, old.trainer)
runners = [st.Ours(d, m, k, b, 2000, 100), old, st.Sparsify(d, m, k, b, 2000, 100)]
for r in runners:
    for i in range(30):
        r.step(xs[i % 8])
st._sync()


def wall(r, n=100):
    st._sync()
    t = time.perf_counter()
    for i in range(n):
        r.step(xs[i % 8])
    st._sync()
    return (time.perf_counter() - t) / n * 1e3


for rnd in range(4):
    print("round", rnd, {r.name: round(wall(r), 3) for r in runners}, "ms/step", flush=True)

for r in runners:
    st._sync()
    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    ) as prof:
        for i in range(20):
            r.step(xs[i % 8])
        st._sync()
    ka = prof.key_averages()
    print(f"\n##### {r.name}: 20 steps")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=28, max_name_column_width=60))
    print(
        ka.table(
            sort_by="self_cuda_time_total" if DEV == "cuda" else "cpu_time_total",
            row_limit=15,
            max_name_column_width=60,
        )
    )
    n_ops = sum(e.count for e in ka if e.key.startswith("aten::"))
    n_launch = sum(
        e.count
        for e in ka
        if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    )
    n_sync = sum(e.count for e in ka if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
    print(
        f"{r.name}: aten ops/step {n_ops / 20:.0f}, launches/step {n_launch / 20:.0f}, sync+memcpy/step {n_sync / 20:.1f}"
    )
# where our step syncs
if DEV == "cuda":
    torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    runners[0].step(xs[0])
if DEV == "cuda":
    torch.cuda.set_sync_debug_mode(0)
print(f"\nours: {len(w)} synchronizing calls in one step")
for x in w:
    print(" -", str(x.message)[:120], "@", f"{x.filename}:{x.lineno}")
