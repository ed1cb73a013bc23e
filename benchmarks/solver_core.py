"""Benchmark of the solver core on a Gauss-Newton system of a 3D displacement field.

System (n = 3 s^3 unknowns, float32): `(H + lam L) u = b` with per-voxel 3x3 SPD data blocks
`H_v = g_v g_v^T + eps I` (g a random smooth image gradient, as in J^T J of an SSD term) and L
the 6-neighbourhood grid Laplacian per component (Neumann). All solvers run to the same
relative residual with Jacobi preconditioning (pyamg: its own V-cycle):

* shapeflow CG, matrix-free: `grid_normal_operator` (stencil and per-voxel 3x3 blocks fused
  into one pass by the numba kernel of `shapeflow/solvers/_fused.py`, with `p . Ap` taken in
  the same pass), at 1 and 2 torch threads; its torch fallback (slab-blocked eager ops, used
  without numba, on GPUs and under autograd) is timed as the matvec column "torch slabs";
* shapeflow CG, matrix-free, composed by hand from eager ops (`grid_laplacian_apply` + the
  rank-one data term), as a user would write it;
* shapeflow CG on the assembled CSR matrix (torch sparse);
* `scipy.sparse.linalg.cg` on the same CSR matrix (SciPy's own Jacobi via M);
* pyamg smoothed aggregation + CG (setup time reported apart);
* `linear_solve` (implicit mode): backward (one adjoint CG) against its forward.

A separate section, "general sparse CG vs scipy.sparse.linalg.cg", times `conjugate_gradient`
on a user's sparse matrix (the 64^3 7-point `grid_laplacian` plus a positive diagonal, float64
COO input, tol 1e-6, without and with Jacobi; the CSR conversion counted in our time) against
SciPy's CG on the same matrix in the same run, at 1 and 2 torch threads, with its SpMV (numba
CSR kernel, torch CSR matmul, SciPy) and our torch fallback (numba disabled).
`--sparse-only` runs that section alone and keeps the other rows of the results.

Also measures memory bandwidth (a large tensor copy, the best over the thread counts) and
compares the stencil matvec with the bandwidth bound `bytes / bandwidth` (the copy timed again
next to the matvecs of each size), bytes = read u, read
g, write A u (9 floats per voxel). Times are medians of repeats. Torch threads are set only
inside `torch_threads` (restored after); the load average is recorded before and after.

    python benchmarks/solver_core.py [--quick] [--sizes 64 128] [--threads 1 2] [--sparse-only]

Writes benchmarks/results/solver_core.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np
import scipy
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F

from shapeflow.regularizers import grid_laplacian_apply
from shapeflow.solvers import conjugate_gradient, linear_solve
from shapeflow.solvers.normal.grid import grid_normal_operator

RESULTS = Path(__file__).parent / "results"
LAM, EPS, TOL = 1.0, 0.05, 1e-4
LS_PAIRS = 5                     # (b, w) pairs for the linear_solve backward / forward rows


def timed(fn, repeats=1):
    """Median seconds over `repeats` and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@contextlib.contextmanager
def without_numba():
    """Run `grid_normal_operator` on its torch fallback (as without numba)."""
    from shapeflow.solvers.normal import _fused

    available = _fused.available
    _fused.available = lambda u, jac: False
    try:
        yield
    finally:
        _fused.available = available


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch threads, restoring the previous count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def smooth_gradient(s: int, seed: int = 0) -> torch.Tensor:
    """Random smooth image gradient g: (3, s, s, s), |g|^2 of order 1."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 1, s, s, s, generator=g)
    k = torch.exp(-0.5 * (torch.arange(-6, 7, dtype=torch.float32) / 2.0) ** 2)
    k = k / k.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = -1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = 6
        img = F.conv3d(F.pad(img, pad, mode="replicate"), k.reshape(shape))
    grads = torch.stack(torch.gradient(img[0, 0]))
    return (grads / grads.pow(2).sum(0).mean().sqrt()).contiguous()


def make_matvec(g: torch.Tensor):
    """Matrix-free `U -> (g g^T + eps I) U + lam L U` on (3, *S) fields, composed of eager ops."""

    def apply(U: torch.Tensor) -> torch.Tensor:
        out = grid_laplacian_apply(U, 1.0)
        if LAM != 1.0:
            out.mul_(LAM)
        gu = g[0] * U[0]  # g . u per voxel
        gu.addcmul_(g[1], U[1]).addcmul_(g[2], U[2])
        out.addcmul_(g, gu.unsqueeze(0)).add_(U, alpha=EPS)
        return out

    return apply


def assemble_scipy(g: torch.Tensor) -> sp.csr_matrix:
    """The same system as a SciPy CSR matrix (rows follow U.reshape(-1), C order)."""
    s = g.shape[1]

    def lap1(m):
        main = np.full(m, 2.0)
        main[0] = main[-1] = 1.0
        return sp.diags([-np.ones(m - 1), main, -np.ones(m - 1)], [-1, 0, 1])

    eye = sp.identity(s)
    L = sp.kron(sp.kron(lap1(s), eye), eye) + sp.kron(sp.kron(eye, lap1(s)), eye) + sp.kron(eye, sp.kron(eye, lap1(s)))
    gf = g.reshape(3, -1).double().numpy()
    blocks = [[sp.diags(gf[c] * gf[d] + (EPS if c == d else 0.0)) for d in range(3)] for c in range(3)]
    A = sp.bmat(blocks) + LAM * sp.block_diag([L, L, L])
    return sp.csr_matrix(A, dtype=np.float32)


def torch_csr(A: sp.csr_matrix) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        torch.from_numpy(A.indptr.astype(np.int64)), torch.from_numpy(A.indices.astype(np.int64)),
        torch.from_numpy(A.data), A.shape,
    )


def bandwidth(nbytes: int = 1 << 29, repeats: int = 7) -> float:
    """Bytes per second of a large float32 copy (read + write counted), median of repeats."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t, _ = timed(lambda: dst.copy_(src), repeats=repeats)
    return 2 * nbytes / t


def rel_residual(A: sp.csr_matrix, x: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(b - A @ x) / np.linalg.norm(b))


def run_size(s: int, bw: float, with_amg: bool, repeats: int, threads: list[int]) -> list[dict]:
    rows = []
    n = 3 * s**3
    g = smooth_gradient(s)
    matvec = make_matvec(g)
    fused = grid_normal_operator(g.unsqueeze(0), lam=LAM, damping=EPS)
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(3, s, s, s, generator=gen)
    # matrix-free matvecs first: once the ~0.5 GB CSR matrices have been built, the same kernels
    # on the same tensors run 1.3-1.6x slower on this VM for the rest of the process (measured;
    # memory management, not our code), so the bandwidth comparison is made before, and the
    # fused matvec is timed again after the assembly for the record
    U = torch.randn(3, s, s, s)
    out = torch.empty_like(U)
    nbytes = 9 * 4 * s**3
    mv_repeats = 15
    matvec_rows = []
    # the copy bandwidth is measured again here, next to the matvecs, per thread count: on this VM
    # it drifts within a run (e.g. 25 -> 16 GB/s at 1 thread after the large allocations of a
    # previous size), and kernel and copy should see the same memory system
    bws = {}
    for nt in threads:
        with torch_threads(nt):
            bws[nt] = bandwidth()
    machine_bound = nbytes / max(bws.values())
    for nt in threads:
        bound = nbytes / bws[nt]
        with torch_threads(nt):
            # into a preallocated output, as in the CG loop (a fresh 25 MB result per call can cost
            # page faults on the order of the matvec itself)
            t_fused, _ = timed(lambda: fused(U, out=out), repeats=mv_repeats)
            t_fdot, _ = timed(lambda: fused.apply_dot(U, out=out), repeats=mv_repeats)
            t_eager, _ = timed(lambda: matvec(U), repeats=mv_repeats)
            with without_numba():
                t_slabs, _ = timed(lambda: fused(U, out=out), repeats=mv_repeats)
        matvec_rows.append({"tool": "matvec", "case": f"GN 3D field {s}^3", "size": s, "threads": nt,
                            "fused_matvec_s": t_fused, "fused_matvec_dot_s": t_fdot, "eager_matvec_s": t_eager,
                            "torch_slabs_matvec_s": t_slabs, "bandwidth_GBps": bws[nt] / 1e9,
                            "bandwidth_bound_s": bound, "machine_bound_s": machine_bound,
                            "fused_vs_bound": t_fused / bound, "eager_vs_bound": t_eager / bound,
                            "fused_vs_machine_bound": t_fused / machine_bound})
        print(f"  matvec {nt} thread(s): fused {t_fused*1e3:.2f} ms (+dot {t_fdot*1e3:.2f}), torch slabs "
              f"{t_slabs*1e3:.2f}, eager {t_eager*1e3:.2f} ms, bound {bound*1e3:.2f} ms at {bws[nt]/1e9:.1f} GB/s "
              f"(machine bound {machine_bound*1e3:.2f} ms)", flush=True)

    t_asm, A = timed(lambda: assemble_scipy(g))
    diag = A.diagonal().astype(np.float32)
    At = torch_csr(A)
    b_np = b.reshape(-1).numpy()
    Mvec = torch.from_numpy(diag)
    op = lambda v: matvec(v.view(3, s, s, s)).view(-1)  # noqa: E731
    case = f"GN 3D field {s}^3"

    def row(tool, seconds, iterations, x_np, **extra):
        r = {"tool": tool, "case": case, "size": s, "unknowns": n, "seconds": seconds,
             "iterations": iterations, "residual": rel_residual(A, x_np.astype(np.float64), b_np.astype(np.float64)),
             **extra}
        rows.append(r)
        print(f"  {tool:<48} {seconds:8.3f} s  its {iterations!s:>5}  res {r['residual']:.2e}", flush=True)

    for r in matvec_rows:  # sparse matvecs, and the fused one again, after the assembly
        with torch_threads(r["threads"]):
            r["torch_csr_matvec_s"], _ = timed(lambda: At @ b.reshape(-1), repeats=5)
            r["fused_matvec_after_assembly_s"], _ = timed(lambda: fused(U, out=out), repeats=mv_repeats)
            r["bandwidth_after_assembly_GBps"] = bandwidth() / 1e9
        print(f"  matvec {r['threads']} thread(s) after the CSR assembly: fused "
              f"{r['fused_matvec_after_assembly_s']*1e3:.2f} ms, torch CSR {r['torch_csr_matvec_s']*1e3:.1f} ms, "
              f"copy bandwidth {r['bandwidth_after_assembly_GBps']:.1f} GB/s",
              flush=True)
    rows += matvec_rows
    t_scipy_mv, _ = timed(lambda: A @ b_np, repeats=5)
    for r in rows:
        if r["tool"] == "matvec":
            r["scipy_csr_matvec_s"] = t_scipy_mv

    with torch.no_grad():
        for nt in threads:
            with torch_threads(nt):
                t, (x, info) = timed(lambda: conjugate_gradient(fused, b.reshape(-1), M="jacobi", tol=TOL), repeats)
            row(f"shapeflow CG matrix-free (fused), {nt} thread(s)", t, int(info.iterations), x.numpy(), threads=nt)
        with torch_threads(threads[0]):
            t, (x, info) = timed(lambda: conjugate_gradient(op, b.reshape(-1), M=Mvec, tol=TOL), repeats)
            row(f"shapeflow CG matrix-free (eager ops), {threads[0]} thread(s)", t, int(info.iterations),
                x.numpy(), threads=threads[0])
            t, (x, info) = timed(lambda: conjugate_gradient(At, b.reshape(-1), M=Mvec, tol=TOL), 1 if s > 64 else repeats)
            row(f"shapeflow CG sparse CSR, {threads[0]} thread(s)", t, int(info.iterations), x.numpy(), threads=threads[0])

    its = [0]

    def count(_):
        its[0] += 1

    Mj = sp.diags(1.0 / diag)

    def scipy_cg():
        its[0] = 0
        return spla.cg(A, b_np, rtol=TOL, atol=0.0, M=Mj, callback=count)[0]

    t, x = timed(scipy_cg, repeats)
    row("scipy.sparse.linalg.cg (Jacobi)", t, its[0], x)

    if with_amg:
        import pyamg

        t_setup, ml = timed(lambda: pyamg.smoothed_aggregation_solver(A))
        res: list[float] = []
        t, x = timed(lambda: ml.solve(b_np, tol=TOL, accel="cg", residuals=res, maxiter=500))
        row("pyamg SA + CG", t, len(res) - 1, x, setup_seconds=t_setup, total_seconds=t + t_setup)

    # linear_solve: backward (one adjoint CG) against forward, matrix-free (fused) operator, over
    # several (b, w) pairs: loss = w . x, so the backward solves A g_b = w, a right-hand side of
    # its own whose CG may need a few more or fewer iterations than b's
    with torch_threads(threads[0]):
        for pair in range(LS_PAIRS):
            gen_pair = torch.Generator().manual_seed(100 + pair)
            d = torch.zeros(n, requires_grad=True)
            bb = torch.randn(n, generator=gen_pair).requires_grad_()
            w = torch.randn(n, generator=gen_pair)
            t_fwd, x = timed(lambda: linear_solve(fused, d, bb, M=Mvec, tol=TOL), repeats)
            loss = (x * w).sum()
            t_bwd, _ = timed(lambda: torch.autograd.grad(loss, (d, bb), retain_graph=True), repeats)
            with torch.no_grad():
                its_fwd = int(conjugate_gradient(fused, bb.detach(), M=Mvec, tol=TOL)[1].iterations)
                its_bwd = int(conjugate_gradient(fused, w, M=Mvec, tol=TOL)[1].iterations)
            ratio = t_bwd / t_fwd
            per_it = (t_bwd / its_bwd) / (t_fwd / its_fwd)
            rows.append({"tool": "linear_solve backward / forward", "case": case, "size": s, "threads": threads[0],
                         "unknowns": n, "pair": pair, "seconds": t_bwd, "forward_seconds": t_fwd, "ratio": ratio,
                         "forward_iterations": its_fwd, "backward_iterations": its_bwd, "ratio_per_iteration": per_it})
            print(f"  linear_solve pair {pair}: forward {t_fwd:.3f} s ({its_fwd} its), backward {t_bwd:.3f} s "
                  f"({its_bwd} its), ratio {ratio:.2f}, per iteration {per_it:.2f}", flush=True)

    scipy_s = next(r for r in rows if r["tool"].startswith("scipy"))["seconds"]
    best = min((r for r in rows if "(fused)" in r["tool"]), key=lambda r: r["seconds"])
    best["headline"] = True
    for r in rows:
        if "iterations" in r:
            r["ratio_to_shapeflow"] = r["seconds"] / best["seconds"]
            r["speedup_vs_scipy"] = scipy_s / r["seconds"]
    print(f"  (assembly of the CSR matrix for the sparse rows: {t_asm:.1f} s, not timed in the rows)")
    return rows


SPARSE_SIZE, SPARSE_TOL = 64, 1e-6


@contextlib.contextmanager
def without_sparse_numba():
    """Run the general sparse CG on its torch fallback (torch CSR matmul, torch vector updates)."""
    from shapeflow.solvers.linear import _sparse

    available = _sparse.numba_available
    _sparse.numba_available = lambda: False
    try:
        yield
    finally:
        _sparse.numba_available = available


@contextlib.contextmanager
def blas_threads(n: int):
    """NumPy's BLAS (SciPy CG's dots and axpys) at `n` threads, restored after (threadpoolctl if
    installed). On this 2-CPU VM OpenBLAS's default 2 threads, next to the idle thread pools of
    torch and numba, made SciPy's CG up to 5x slower than run alone, which would flatter us."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def sparse_system(s: int = SPARSE_SIZE):
    """The 3D 7-point grid Laplacian (Neumann) of s^3 voxels plus a positive diagonal in [0.01, 1],
    float64 COO (coalesced), and a random right-hand side (n,)."""
    from shapeflow.regularizers import grid_laplacian

    n = s**3
    L = grid_laplacian((s, s, s), dtype=torch.float64)
    d = torch.linspace(0.01, 1.0, n, dtype=torch.float64)
    diag = torch.sparse_coo_tensor(torch.arange(n).expand(2, n), d, (n, n), check_invariants=False)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return (L + diag).coalesce(), b


def run_sparse_cg(threads: list[int], repeats: int = 7) -> list[dict]:
    """General sparse CG (COO input, converted to CSR inside each solve) against SciPy's CG."""
    from shapeflow.solvers.linear.operators import to_scipy_csr
    from shapeflow.solvers.linear._sparse import CsrOperator

    A, b = sparse_system()
    As, b_np = to_scipy_csr(A), b.numpy()
    n = b.shape[0]
    op, out = CsrOperator(A), torch.empty_like(b)
    rows = []
    with torch.no_grad():
        conjugate_gradient(A, b, M="jacobi", tol=SPARSE_TOL)  # compile / load the kernels
        for precond in (None, "jacobi"):
            Mj = None if precond is None else sp.diags(1.0 / As.diagonal())
            its = [0]

            def scipy_cg():
                its[0] = 0
                return spla.cg(As, b_np, rtol=SPARSE_TOL, atol=0.0, M=Mj,
                               callback=lambda _: its.__setitem__(0, its[0] + 1))[0]

            for nt in threads:
                with torch_threads(nt):
                    times = []
                    for _ in range(repeats):  # ours and SciPy alternate, sharing the machine's state
                        t, (x, info) = timed(lambda: conjugate_gradient(A, b, M=precond, tol=SPARSE_TOL))
                        with blas_threads(nt):
                            t_sp, x_sp = timed(scipy_cg)
                        times.append((t, t_sp))
                    with without_sparse_numba():
                        t_fb, _ = timed(lambda: conjugate_gradient(A, b, M=precond, tol=SPARSE_TOL), max(1, repeats // 2))
                    t_spmv, _ = timed(lambda: op.apply_dot(b, out=out), 20)
                    t_torch_spmv, _ = timed(lambda: op.csr @ b, 20)
                    with blas_threads(nt):
                        t_scipy_spmv, _ = timed(lambda: As @ b_np, 20)
                ours = statistics.median(t for t, _ in times)
                theirs = statistics.median(t for _, t in times)
                r = {"tool": "general sparse CG", "case": f"7-point Laplacian + diag {SPARSE_SIZE}^3", "unknowns": n,
                     "threads": nt, "M": precond or "none", "seconds": ours, "seconds_all": [t for t, _ in times],
                     "scipy_seconds": theirs, "scipy_seconds_all": [t for _, t in times], "speedup_vs_scipy": theirs / ours,
                     "iterations": int(info.iterations), "scipy_iterations": its[0],
                     "residual": rel_residual(As, x.numpy(), b_np), "scipy_residual": rel_residual(As, x_sp, b_np),
                     "torch_fallback_seconds": t_fb, "numba_spmv_dot_s": t_spmv, "torch_csr_spmv_s": t_torch_spmv,
                     "scipy_spmv_s": t_scipy_spmv}
                r["target_met"] = r["speedup_vs_scipy"] >= 1.0
                rows.append(r)
                print(f"  sparse CG M={r['M']:<6} {nt} thread(s): ours {ours:.3f} s ({r['iterations']} its), SciPy "
                      f"{theirs:.3f} s ({its[0]} its), speed-up {r['speedup_vs_scipy']:.2f}; torch fallback {t_fb:.3f} s; "
                      f"SpMV numba {t_spmv*1e3:.2f} ms, torch CSR {t_torch_spmv*1e3:.2f} ms, SciPy {t_scipy_spmv*1e3:.2f} ms",
                      flush=True)
    return rows


def sparse_lines(sparse: list[dict], machine: dict) -> list[str]:
    """The markdown section "general sparse CG vs scipy.sparse.linalg.cg"."""
    if not sparse:
        return []
    info = machine.get("sparse_cg", {})
    lines = ["", "## general sparse CG vs scipy.sparse.linalg.cg", "",
             f"`conjugate_gradient(A, b, M, tol={SPARSE_TOL:g})` on a user's sparse matrix: the {SPARSE_SIZE}^3 "
             "7-point `grid_laplacian` + a positive diagonal (float64 COO input; the one CSR conversion per solve and "
             "the Jacobi diagonal are inside our time), against `scipy.sparse.linalg.cg` on the same CSR matrix, the "
             "two alternating in the same run (median of "
             f"{len(sparse[0]['seconds_all'])} each; SciPy with NumPy's BLAS limited to the row's thread count). Target: "
             "at least as fast as SciPy (goal 2x). `torch fallback`: our CG with numba disabled (torch CSR matmul, "
             "used on GPUs and without numba). SpMV in ms (ours: numba CSR kernel with `p . Ap`). 1-minute load "
             f"average {info.get('load_average', [float('nan')])[0]:.2f} at the start of this section"
             + (", run alone with `--sparse-only` (the tables above are from an earlier full run; their "
                "\"shapeflow CG sparse CSR\" rows predate the CSR kernels)." if info.get("sparse_only") else "."), "",
             "| case | M | threads | ours (s, its) | SciPy (s, its) | SciPy / ours | target (>= 1x, goal 2x) | torch fallback (s) | SpMV numba | SpMV torch CSR | SpMV SciPy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sparse:
        ratio = r["speedup_vs_scipy"]
        met = "met, goal 2x met" if ratio >= 2.0 else ("met (goal 2x not met)" if ratio >= 1.0 else "**not met**")
        lines.append(f"| {r['case']} | {r['M']} | {r['threads']} | {r['seconds']:.3f} ({r['iterations']}) | "
                     f"{r['scipy_seconds']:.3f} ({r['scipy_iterations']}) | {ratio:.2f} | {met} | "
                     f"{r['torch_fallback_seconds']:.3f} | {r['numba_spmv_dot_s']*1e3:.2f} | {r['torch_csr_spmv_s']*1e3:.2f} | "
                     f"{r['scipy_spmv_s']*1e3:.2f} |")
    lines += ["", "Every repeat (s), ours / SciPy: " + "; ".join(
        f"M={r['M']} {r['threads']}t: " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(r["seconds_all"], r["scipy_seconds_all"]))
        for r in sparse)]
    return lines


def write(rows: list[dict], machine: dict, quick: bool, sparse: Optional[list[dict]] = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    sparse = sparse or []
    (RESULTS / "solver_core.json").write_text(
        json.dumps({"machine": machine, "quick": quick, "rows": rows, "sparse_cg": sparse}, indent=2))
    load = machine["load_average"]
    lines = [
        "# Solver core benchmark",
        "",
        f"Machine: {machine['cpu_count']} CPUs ({machine['processor']}), torch {machine['torch']}, SciPy "
        f"{machine['scipy']}, torch threads {machine['threads']} (set per row, restored after), 1-minute load "
        f"average {load[0]:.2f} at start" + (f", {machine['load_average_end'][0]:.2f} at the end" if "load_average_end" in machine else "")
        + f". Memory bandwidth (copy, read + write): {machine['bandwidth_GBps']:.1f} GB/s "
        f"(per thread count: {machine['bandwidth_by_threads_GBps']}). float32, relative residual {TOL:g}, lam {LAM}, "
        f"eps {EPS}. Medians of repeats. {'Quick run.' if quick else ''}",
        "",
        "| case | tool | seconds | iterations | residual | speed-up vs SciPy CG | ratio to headline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "iterations" in r:
            secs = f"{r['seconds']:.3f}" + (f" (+{r['setup_seconds']:.2f} setup)" if "setup_seconds" in r else "")
            tool = f"**{r['tool']}**" if r.get("headline") else r["tool"]
            lines.append(f"| {r['case']} | {tool} | {secs} | {r['iterations']} | {r['residual']:.1e} | "
                         f"{r['speedup_vs_scipy']:.2f} | {r['ratio_to_shapeflow']:.2f} |")
    lines += ["", "Matvec `(g g^T + eps I + lam L) u` (ms) against the bandwidth bound: 9 floats per voxel / copy "
              "bandwidth, the copy timed just before the matvecs with the same thread count (`bound`), and the best "
              "copy over the thread counts (`machine bound`). `fused` is the numba kernel, `torch slabs` its torch "
              "fallback, `eager ops` the benchmark's own composition of torch ops:", "",
              "| case | threads | fused (numba) | fused + `p . Ap` | torch slabs (fallback) | eager ops | copy GB/s | bound | fused / bound | fused / machine bound | torch slabs / bound | eager / bound | fused, after CSR assembly | torch CSR | SciPy CSR |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["tool"] == "matvec":
            lines.append(f"| {r['case']} | {r['threads']} | {r['fused_matvec_s']*1e3:.2f} | {r['fused_matvec_dot_s']*1e3:.2f} | "
                         f"{r['torch_slabs_matvec_s']*1e3:.2f} | {r['eager_matvec_s']*1e3:.2f} | {r['bandwidth_GBps']:.1f} | "
                         f"{r['bandwidth_bound_s']*1e3:.2f} | {r['fused_vs_bound']:.1f} | {r['fused_vs_machine_bound']:.1f} | "
                         f"{r['torch_slabs_matvec_s'] / r['bandwidth_bound_s']:.1f} | "
                         f"{r['eager_vs_bound']:.1f} | {r['fused_matvec_after_assembly_s']*1e3:.2f} | {r['torch_csr_matvec_s']*1e3:.1f} | {r.get('scipy_csr_matvec_s', float('nan'))*1e3:.1f} |")
    lines += ["", "`linear_solve` (implicit mode), loss `w . x`: forward solves `A x = b`, backward solves `A g_b = w` "
              "(one adjoint CG, same operator, preconditioner and tolerance). Iterations from the same solves run "
              "alone; per iteration = (backward s / its) / (forward s / its).", "",
              "| case | pair | forward (s, its) | backward (s, its) | backward / forward | per iteration |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["tool"].startswith("linear_solve"):
            lines.append(f"| {r['case']} | {r['pair']} | {r['forward_seconds']:.3f} ({r['forward_iterations']}) | "
                         f"{r['seconds']:.3f} ({r['backward_iterations']}) | {r['ratio']:.2f} | {r['ratio_per_iteration']:.2f} |")
    for case in dict.fromkeys(r["case"] for r in rows if r["tool"].startswith("linear_solve")):
        ls = [r for r in rows if r["tool"].startswith("linear_solve") and r["case"] == case]
        lines.append(f"| {case} | median | | | {statistics.median(r['ratio'] for r in ls):.2f} | "
                     f"{statistics.median(r['ratio_per_iteration'] for r in ls):.2f} |")
    lines += sparse_lines(sparse, machine)
    (RESULTS / "solver_core.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32^3 only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--no-amg", action="store_true")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts to time the matrix-free CG with (the first one also runs "
                             "the eager, CSR and linear_solve rows); default 1 and 2, or 1 alone when the "
                             "1-minute load average is 0.7 or more (2 threads under contention stall on OpenMP)")
    parser.add_argument("--sparse-only", action="store_true",
                        help="run only the section 'general sparse CG vs scipy.sparse.linalg.cg' (about a "
                             "minute) and keep the other rows of the existing results")
    args = parser.parse_args()
    sizes = args.sizes or ([32] if args.quick else [64, 128])
    load = os.getloadavg()
    sparse_threads = args.threads or [1, 2]
    if args.sparse_only:
        old = json.loads((RESULTS / "solver_core.json").read_text()) if (RESULTS / "solver_core.json").exists() else {}
        machine = old.get("machine", {})
        machine["sparse_cg"] = {"load_average": load, "threads": sparse_threads, "sparse_only": True}
        print(f"general sparse CG, load {load[0]:.2f}", flush=True)
        sparse = run_sparse_cg(sparse_threads)
        machine["sparse_cg"]["load_average_end"] = os.getloadavg()
        if old:
            write(old["rows"], machine, old.get("quick", False), sparse)
        else:
            (RESULTS / "solver_core.md").write_text("\n".join(sparse_lines(sparse, machine)[1:]) + "\n")
        return
    if args.threads is None:
        args.threads = [1, 2] if load[0] < 0.7 else [1]
    bws = {}
    for nt in args.threads:
        with torch_threads(nt):
            bws[nt] = bandwidth()
    bw = max(bws.values())
    machine = {"cpu_count": os.cpu_count(), "load_average": load, "threads": args.threads,
               "torch": torch.__version__, "scipy": scipy.__version__, "numpy": np.__version__,
               "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
               "bandwidth_GBps": bw / 1e9, "bandwidth_by_threads_GBps": {k: round(v / 1e9, 1) for k, v in bws.items()}}
    print(f"bandwidth {bw/1e9:.1f} GB/s {machine['bandwidth_by_threads_GBps']}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, load {load[0]:.2f}", flush=True)
    # the general sparse section first: after the large CSR assemblies of the sizes below, kernels
    # run 1.3-1.6x slower for the rest of the process on this VM (see run_size)
    machine["sparse_cg"] = {"load_average": os.getloadavg(), "threads": sparse_threads, "sparse_only": False}
    print("general sparse CG", flush=True)
    sparse = run_sparse_cg(sparse_threads)
    rows = []
    for s in sizes:
        print(f"size {s}^3", flush=True)
        rows += run_size(s, bw, with_amg=not args.no_amg, repeats=5 if s <= 64 else 3, threads=args.threads)
        machine["load_average_end"] = os.getloadavg()
        write(rows, machine, args.quick, sparse)


if __name__ == "__main__":
    main()
