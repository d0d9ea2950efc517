"""GPU checks (run on a CUDA machine): solves and gradients against the CPU path, and host syncs per solve.
Exits non-zero on a mismatch."""
# ruff: noqa: B023, E501, E731  (a check script: closures are called inside their loop)

import warnings

import torch

from fedeq.deq import DEQ, solve

dev = torch.device("cuda")


def host_syncs(run):
    """How many times ``run()`` synchronises the host with the GPU (torch's sync debug mode warns on each)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run()
    torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in rec)


g = torch.Generator().manual_seed(0)
d, b = 48, 16
W = torch.randn(d, d, generator=g, dtype=torch.float64)
W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
c = (
    torch.randn(b, d, generator=g, dtype=torch.float64)
    * torch.linspace(0.1, 2, b, dtype=torch.float64)[:, None]
)
print("solver  max|z_gpu-z_cpu|  nfe_equal  conv_equal  syncs(max_iter=40)")
for name in ("fixed_point", "anderson", "broyden"):
    out = {}
    for device in ("cpu", "cuda"):
        Wd, cd = W.to(device), c.to(device)
        z, st = solve(lambda z: torch.tanh(z @ Wd.T + cd), torch.zeros_like(cd), name, max_iter=40, tol=1e-8)
        out[device] = (z.cpu(), st.nfe.cpu(), st.converged.cpu())
    Wd, cd = W.to(dev), c.to(dev)
    syncs = host_syncs(
        lambda: solve(lambda z: torch.tanh(z @ Wd.T + cd), torch.zeros_like(cd), name, max_iter=40, tol=1e-30)
    )
    err = (out["cpu"][0] - out["cuda"][0]).abs().max().item()
    print(
        f"{name:12s} {err:.2e}  {torch.equal(out['cpu'][1], out['cuda'][1])}  "
        f"{torch.equal(out['cpu'][2], out['cuda'][2])}  {syncs}"
    )
    assert err < 1e-9, name


class Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(d, d, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(W)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


print("backward   cos(gpu,cpu)  max rel err")
for solver in ("anderson", "broyden"):
    for backward in ("ift", "phantom", "broyden_reuse") if solver == "broyden" else ("ift", "phantom"):
        grads = {}
        for device in ("cpu", "cuda"):
            torch.manual_seed(0)
            cell = Cell().to(device)
            deq = DEQ(cell, solver=solver, f_max_iter=40, b_max_iter=40, tol=1e-10, backward=backward)
            x = c.to(device).clone().requires_grad_(True)
            res = deq(x, torch.zeros_like(x))
            (res.z**2).sum().backward()
            grads[device] = torch.cat([cell.lin.weight.grad.flatten(), x.grad.flatten()]).cpu()
        a, bb = grads["cpu"], grads["cuda"]
        cos = torch.nn.functional.cosine_similarity(a, bb, dim=0).item()
        rel = ((a - bb).norm() / a.norm()).item()
        print(f"{solver}/{backward:14s} {cos:.10f} {rel:.2e}")
        assert rel < 1e-6, (solver, backward)

print("GPU CHECKS OK")
