"""Seed 001 (Watson, Cherry & Lang, "Applications of AD in image registration") reproduced.

Parts (each writes its rows into benchmarks/results/newton.json; the .md table is rebuilt from
all rows, every number next to the paper's):

* fig2: a 2D affine pair (a striped blob, rotated by 0.1 rad, scaled 1.05, shifted (7, -6) px)
  where exact Newton from the identity at theta = 0 stops in a wrong minimum and the
  predictor-corrector along theta = 256, 64, 16, 4, 0 reaches the right one (paper Fig. 2);
  plain continuation and the Gauss-Newton predictor are run too. Plot: the images and the loss
  J(w; theta) along theta for the minimisers found.
* predictor: relative loss and gradient-norm differences of the prediction, exact Hessian vs
  Gauss-Newton (paper Fig. 3: exact helps, GN hurts).
* ad: cost of loss, gradient, Hessian, forward map and Jacobian, as ratios to the loss / forward
  map, for the 6-parameter affine and a 50-parameter Neural-ODE transform (paper Table 1).
* superres: 20x20 reference, four 10x10 views, 10 Gauss-Newton iterations of variable projection,
  relative reconstruction error with df/dw ignored vs differentiated through all CG iterations
  (paper: 25.61 % vs 10.7 %), through the last p % (Figs. 7-8), with a fixed number of CG steps
  (Fig. 10), and a Taylor test of the reduced Jacobians (Fig. 7).

    python benchmarks/newton.py [--parts fig2 predictor ad superres] [--quick]

Writes benchmarks/results/newton.{json,md} and newton_fig2.png, newton_superres.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from shapeflow.grids import Grid
from shapeflow.interpolation import spline_sample
from shapeflow.pipelines.image_affine import AffineSSD, minimize_affine
from shapeflow.solvers import VariableProjection, continuation, hessian, minimize_newton
from shapeflow.superres import SuperResolutionModel, reconstruct

D = torch.float64
RESULTS = Path(__file__).parent / "results"
THETAS = [256.0, 64.0, 16.0, 4.0, 0.0]


def fig2_pair(n: int = 40):
    """(AffineSSD objective, true parameters): fixed = a Gaussian blob times a checker of period 4 px
    (of the 40x40 picture; n samples it on a finer grid of the same square)."""
    grid = Grid((n, n), torch.full((2,), 40.0 / n, dtype=D), torch.zeros(2, dtype=D), torch.eye(2, dtype=D))
    P = grid.points(D)

    def image(P):
        blob = torch.exp(-(((P[..., 0] - 20) ** 2) / 120 + ((P[..., 1] - 20) ** 2) / 60))
        return blob * (0.5 + 0.5 * torch.cos(2 * math.pi * P[..., 0] / 4) * torch.cos(2 * math.pi * P[..., 1] / 4))

    c = P.reshape(-1, 2).mean(0)
    angle = 0.1
    A = 1.05 * torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=D)
    t = torch.tensor([7.0, -6.0], dtype=D)
    fixed, moving = image(P)[None], image((P - c - t) @ torch.linalg.inv(A).T + c)[None]
    objective = AffineSSD(moving, grid, fixed, grid)
    return objective, torch.cat([A.reshape(-1), t / objective.length])


def part_fig2(rows: list, quick: bool) -> None:
    objective, truth = fig2_pair()
    corrector = lambda theta, start: minimize_affine(objective, start, theta, "newton", 40)
    runs = {}
    start = time.perf_counter()
    single = minimize_newton(objective.cost, objective.identity(), maxiter=60, radius=0.25, ftol=1e-10)
    runs["single scale (Newton, theta = 0)"] = (single.x, time.perf_counter() - start, single.iterations)
    for name, predictor in (("continuation (no predictor)", None), ("predictor-corrector, exact Hessian", "newton"),
                            ("predictor-corrector, Gauss-Newton predictor", "gauss-newton")):
        start = time.perf_counter()
        path = continuation(objective.cost, objective.identity(), THETAS, predictor=predictor, corrector=corrector,
                            residual=objective.residual)
        runs[name] = (path.x, time.perf_counter() - start, sum(path.iterations))
        if predictor is not None:
            for p in path.predictions:
                rows.append({"part": "predictor", "predictor": predictor, "theta_from": p.theta_from,
                             "theta_to": p.theta_to, "relative_loss": p.relative_cost,
                             "relative_gradient": p.relative_gradient})
    profiles = {}
    for name, (x, seconds, iterations) in runs.items():
        cost = float(objective.cost(x))
        error = float((x - truth).norm())
        rows.append({"part": "fig2", "method": name, "loss": cost, "loss_at_truth": float(objective.cost(truth)),
                     "parameter_error": error, "right_minimum": error < 0.05, "seconds": seconds,
                     "iterations": iterations})
        profiles[name] = [float(objective.cost(x, th)) for th in THETAS]
    _plot_fig2(objective, runs, profiles)


def _plot_fig2(objective: AffineSSD, runs: dict, profiles: dict) -> None:
    import matplotlib.pyplot as plt

    n = objective.template.grid.shape
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.4))
    axes[0].imshow(objective.fixed.reshape(n), cmap="gray")
    axes[0].set_title("reference R")
    axes[1].imshow(objective.template.data[0], cmap="gray")
    axes[1].set_title("template T")
    for ax, name in zip(axes[2:4], ("predictor-corrector, exact Hessian", "single scale (Newton, theta = 0)")):
        with torch.no_grad():
            warped = objective.template(objective.where(runs[name][0]))[0].reshape(n)
        ax.imshow(warped, cmap="gray")
        ax.set_title(f"T(y(w)): {name.split(',')[0]}\nJ = {float(objective.cost(runs[name][0])):.3g}", fontsize=9)
    for ax in axes[:4]:
        ax.axis("off")
    positions = [max(th, 0.5) for th in THETAS]
    for name, values in profiles.items():
        axes[4].plot(positions, values, "o-", label=name, markersize=3)
    axes[4].set_xscale("log")
    axes[4].invert_xaxis()
    axes[4].set_xlabel("theta (0 drawn at 0.5)")
    axes[4].set_ylabel("J(w; theta) at the final w")
    axes[4].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / "newton_fig2.png", dpi=110)
    plt.close(fig)


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    mean = sum(times) / len(times)
    return times[len(times) // 2], math.sqrt(sum((t - mean) ** 2 for t in times) / len(times))


def _node_transform(points: torch.Tensor, w: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """y = phi_w(x): RK4 on dx/dt = W2 tanh(W1 [x, t] + b1) + b2, 50 parameters (width 8, d = 2)."""
    W1, b1, W2, b2 = w[:24].reshape(8, 3), w[24:32], w[32:48].reshape(2, 8), w[48:50]

    def v(x, t):
        h = torch.tanh(torch.cat([x, t.expand(len(x), 1)], 1) @ W1.T + b1)
        return h @ W2.T + b2

    x, dt = points, 1.0 / steps
    for k in range(steps):
        t = torch.tensor(k * dt, dtype=points.dtype)
        k1 = v(x, t)
        k2 = v(x + dt / 2 * k1, t + dt / 2)
        k3 = v(x + dt / 2 * k2, t + dt / 2)
        k4 = v(x + dt * k3, t + dt)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def part_ad(rows: list, quick: bool) -> None:
    for n in ((40,) if quick else (40, 160)):
        _ad_costs(rows, n, 3 if quick else 10)


def _ad_costs(rows: list, n: int, repeats: int) -> None:
    objective, truth = fig2_pair(n)
    coefficients = objective.template.coefficients(0.0)
    grid = objective.template.grid
    scale = objective.length
    centre = objective.centre
    g = torch.Generator().manual_seed(0)
    w_node = 0.05 * torch.randn(50, dtype=D, generator=g)

    def node_forward(w):
        where = centre + scale * _node_transform((objective.points - centre) / scale, w)
        return spline_sample(coefficients, grid, where).reshape(-1)

    cases = {f"affine (6), {n}x{n}": (lambda w: objective.template(objective.where(w)).reshape(-1), truth + 0.01),
             f"neural ODE (50), {n}x{n}": (node_forward, w_node)}
    for name, (forward, w) in cases.items():
        loss = lambda v, forward=forward: (forward(v) - objective.fixed.reshape(-1)).pow(2).sum() * objective.weight
        timings = {"loss": lambda: loss(w), "gradient": lambda: torch.func.grad(loss)(w),
                   "hessian": lambda: hessian(loss, w, "forward-over-reverse"),
                   "hessian (reverse-over-reverse)": lambda: hessian(loss, w, "reverse-over-reverse"),
                   "forward": lambda: forward(w), "jacobian": lambda: torch.func.jacfwd(forward)(w)}
        for quantity, fn in timings.items():
            ms, sd = _median_ms(fn, repeats)
            rows.append({"part": "ad", "transform": name, "quantity": quantity, "ms": ms, "sd": sd})


def superres_problem(seed: int = 0):
    """(model, views (4, 10, 10), true f (20, 20), true w (18,)): a smooth phantom with an edge."""
    x = torch.linspace(0, 1, 20, dtype=D)
    X, Y = torch.meshgrid(x, x, indexing="ij")
    f = (torch.exp(-((X - 0.4) ** 2 + (Y - 0.55) ** 2) / 0.03) + 0.7 * ((X - 0.7).abs() < 0.12) * ((Y - 0.3).abs() < 0.15)
         + 0.4 * torch.exp(-((X - 0.25) ** 2 / 0.01 + (Y - 0.2) ** 2 / 0.05)))
    g = torch.Generator().manual_seed(seed)
    w = torch.cat([torch.cat([0.04 * torch.randn(4, dtype=D, generator=g), 0.03 * torch.randn(2, dtype=D, generator=g)])
                   for _ in range(3)])
    model = SuperResolutionModel(4, (10, 10), 2)
    views = torch.nn.functional.avg_pool2d(model.warp(w, f)[:, None], 2)[:, 0]
    return model, views, f, w


def part_superres(rows: list, quick: bool) -> None:
    model, views, f_true, w_true = superres_problem()
    iterations = 3 if quick else 10
    settings = [("none", {}), ("full", {}), ("partial", {"p": 0.5}), ("partial", {"p": 0.7}), ("partial", {"p": 0.9}),
                ("inexact", {"cg_iterations": 10}), ("inexact", {"cg_iterations": 25}), ("inexact", {"cg_iterations": 50})]
    if quick:
        settings = settings[:2]
    curves = {}
    for mode, extra in settings:
        start = time.perf_counter()
        fit = reconstruct(list(views), 2, lam=0.01, jacobian=mode, iterations=iterations, **extra)
        label = mode + "".join(f" {k}={v}" for k, v in extra.items())
        error = float((fit.image - f_true).norm() / f_true.norm())
        rows.append({"part": "superres", "jacobian": label, "relative_error": error,
                     "relative_loss": fit.history[-1] / fit.history[0],
                     "relative_gradient": fit.gradient_norms[-1] / fit.gradient_norms[0],
                     "parameter_error": float((fit.parameters.reshape(-1) - w_true).norm() / w_true.norm()),
                     "iterations": fit.iterations, "seconds": time.perf_counter() - start})
        curves[label] = [h / fit.history[0] for h in fit.history]
        print(rows[-1], flush=True)
    taylor = {}
    scale = math.sqrt(model.h_data[0] * model.h_data[1])
    w = 0.5 * w_true
    v = torch.randn(18, dtype=D, generator=torch.Generator().manual_seed(5))
    hs = [2e-2 / 2 ** k for k in range(7)]
    for mode, extra in (("none", {}), ("partial", {"p": 0.5}), ("partial", {"p": 0.9}), ("full", {})):
        vp = VariableProjection(model.predict, views * scale, (20, 20), regularizer=model.gradient, lam=0.01,
                                jacobian=mode, cg_tol=1e-10, **extra)
        r0 = vp.residual(w, vp.solve(w, "exact"))
        Jv = vp.jacobian(w) @ v
        label = mode + "".join(f" p={x}" for x in extra.values())
        errors = []
        for h in hs:
            rh = vp.residual(w + h * v, vp.solve(w + h * v, "exact"))
            errors.append((float((rh - r0).norm()), float((rh - r0 - h * Jv).norm())))
        taylor[label] = errors
        rows.append({"part": "taylor", "jacobian": label, "h": hs, "E0": [e[0] for e in errors],
                     "E1": [e[1] for e in errors], "order": math.log2(errors[-2][1] / errors[-1][1])})
    _plot_superres(curves, taylor, hs)


def _plot_superres(curves: dict, taylor: dict, hs: list) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, values in curves.items():
        axes[0].semilogy(values, "o-", markersize=3, label=label)
    axes[0].set_xlabel("Gauss-Newton iteration")
    axes[0].set_ylabel("relative loss J / J0")
    axes[0].legend(fontsize=7)
    for label, errors in taylor.items():
        axes[1].loglog(hs, [e[1] for e in errors], "o-", markersize=3, label=f"E1, {label}")
    axes[1].loglog(hs, [e[0] for e in taylor["full"]], "k--", label="E0 = |r(w+hv) - r(w)|")
    axes[1].set_xlabel("h")
    axes[1].set_ylabel("|r(w + h v) - r(w) - h J v|")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "newton_superres.png", dpi=110)
    plt.close(fig)


PAPER_AD = {("affine", "gradient"): 2.5, ("affine", "hessian"): 5.7, ("affine", "jacobian"): 11,
            ("neural", "gradient"): 2.7, ("neural", "hessian"): 24, ("neural", "jacobian"): 17}


def write_markdown(rows: list, meta: dict) -> str:
    out = ["# Seed 001 reproduced: exact Newton, predictor-corrector, variable projection", "",
           f"Machine: {meta['machine']}; torch {meta['torch']}; float64, CPU. `python benchmarks/newton.py`. "
           "Each result next to the paper's number; where ours differs the last column says why.", ""]
    fig2 = [r for r in rows if r["part"] == "fig2"]
    if fig2:
        out += ["## Single scale vs predictor-corrector (paper Fig. 2)", "",
                "40x40 striped blob, rotated 0.1 rad, scaled 1.05, shifted (7, -6) px; thetas 256, 64, 16, 4, 0 "
                "(mm^4); corrector: exact Newton with trust region. Picture: `newton_fig2.png`.", "",
                "| method | final J | J at the true map | parameter error | right minimum | Newton iterations | s | paper |",
                "|---|---|---|---|---|---|---|---|"]
        paper = {"single scale (Newton, theta = 0)": "bad local minimiser",
                 "predictor-corrector, exact Hessian": "right minimiser"}
        for r in fig2:
            out.append(f"| {r['method']} | {r['loss']:.4g} | {r['loss_at_truth']:.4g} | {r['parameter_error']:.3g} | "
                       f"{'yes' if r['right_minimum'] else 'no'} | {r['iterations']} | {r['seconds']:.1f} | "
                       f"{paper.get(r['method'], '-')} |")
        out.append("")
    pred = [r for r in rows if r["part"] == "predictor"]
    if pred:
        out += ["## Exact vs Gauss-Newton predictor (paper Fig. 3)", "",
                "Relative loss difference (J(w*) - J(w_pred)) / J(w*) and relative gradient-norm difference at "
                "the next theta (> 0: the prediction helps). Paper: exact Hessian mostly > 0, Gauss-Newton < 0 "
                "(gradient differences below -31000). Ours differs: on this pair both predictors help about equally, "
                "because the residual at the minimiser is small (J* = 1.45 against J = 40 at the identity) and "
                "the term the Gauss-Newton Hessian drops, sum_i r_i grad^2 r_i, scales with the residual; the "
                "paper's pair (not published with the text) evidently had a large one. The last step (theta 4 -> 0) "
                "raises the loss slightly with either predictor: the Euler step over the largest relative "
                "change of theta overshoots.", "",
                "| theta from -> to | exact: loss | exact: gradient | Gauss-Newton: loss | Gauss-Newton: gradient |",
                "|---|---|---|---|---|"]
        steps = sorted({(r["theta_from"], r["theta_to"]) for r in pred}, reverse=True)
        for step in steps:
            get = {r["predictor"]: r for r in pred if (r["theta_from"], r["theta_to"]) == step}
            cells = [f"{get[p]['relative_loss']:+.3g} | {get[p]['relative_gradient']:+.3g}" if p in get else "- | -"
                     for p in ("newton", "gauss-newton")]
            out.append(f"| {step[0]:g} -> {step[1]:g} | {cells[0]} | {cells[1]} |")
        out.append("")
    ad = [r for r in rows if r["part"] == "ad"]
    if ad:
        out += ["## Cost of AD (paper Table 1)", "",
                "Median of repeats; factor = time / loss time (forward map, Jacobian: / forward-map time). The "
                "images are the 40x40 pair above, cubic spline; the Neural ODE is an RK4 (4 steps) flow of a "
                "3-8-2 tanh MLP, 50 parameters. Hessian: forward-over-reverse (`jacfwd(grad)`), and "
                "reverse-over-reverse beside it. Ours differs from the paper's factors mostly on the small "
                "image, where per-op overhead (and `vmap` falling back to loops for some ops in "
                "`jacfwd`) dominates the 1-2 ms loss; at 160x160 the gradient and Jacobian factors approach "
                "the paper's. On this CPU reverse-over-reverse Hessians are faster, so the affine Newton "
                "optimizer uses them.", "",
                "| transform | quantity | ms | factor | paper factor |", "|---|---|---|---|---|"]
        for name in dict.fromkeys(r["transform"] for r in ad):
            get = {r["quantity"]: r for r in ad if r["transform"] == name}
            for q in ("loss", "gradient", "hessian", "hessian (reverse-over-reverse)", "forward", "jacobian"):
                base = get["forward" if q in ("forward", "jacobian") else "loss"]["ms"]
                paper = PAPER_AD.get((name.split()[0], q.split()[0]), 1 if q in ("loss", "forward") else "-")
                out.append(f"| {name} | {q} | {get[q]['ms']:.2f} ± {get[q]['sd']:.2f} | {get[q]['ms'] / base:.1f}x | "
                           f"{paper}x |")
        out.append("")
    sr = [r for r in rows if r["part"] == "superres"]
    if sr:
        paper = {"none": "25.61 %", "full": "10.7 %"}
        out += ["## Super-resolution by variable projection (paper Figs. 5-11)", "",
                "20x20 reference, four 10x10 views (the first fixes the frame; 18 affine parameters), lam = 0.01, "
                "10 Gauss-Newton iterations; the final image solved to tolerance at the fitted maps. Curves and "
                "the Taylor test: `newton_superres.png`. Ours differs from the paper's 25.61 % vs 10.7 %: the "
                "phantom, lam and maps are ours (the paper's are not given), and interpolation is the C2 spline; "
                "the ordering is the same (full < none), and full differentiation reduces the gradient far more "
                "and recovers the maps better, as in the paper's Fig. 5.", "",
                "| df/dw | relative error of f | J / J0 | grad / grad0 | parameter error | s | paper error |",
                "|---|---|---|---|---|---|---|"]
        for r in sr:
            out.append(f"| {r['jacobian']} | {100 * r['relative_error']:.2f} % | {r['relative_loss']:.3g} | "
                       f"{r['relative_gradient']:.3g} | {r['parameter_error']:.3g} | {r['seconds']:.0f} | "
                       f"{paper.get(r['jacobian'], '-')} |")
        out.append("")
    tay = [r for r in rows if r["part"] == "taylor"]
    if tay:
        out += ["Taylor test of the reduced Jacobian (E1 = |r(w+hv) - r(w) - h J v|, h = 0.02 / 2^k): observed order "
                "log2(E1(2h)/E1(h)) at the smallest h (2: exact Jacobian, 1: first-order error).", "",
                "| df/dw | order | E1 at h = 0.02 | E1 at the smallest h |", "|---|---|---|---|"]
        for r in tay:
            out.append(f"| {r['jacobian']} | {r['order']:.2f} | {r['E1'][0]:.3g} | {r['E1'][-1]:.3g} |")
        out.append("")
    return "\n".join(out)


PARTS = {"fig2": part_fig2, "ad": part_ad, "superres": part_superres}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS) + ["predictor"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "newton.json"
    parts = {"fig2" if p == "predictor" else p for p in args.parts}
    new: list = []
    for name in PARTS:
        if name in parts:
            PARTS[name](new, args.quick)
    owned = parts | ({"predictor"} if "fig2" in parts else set()) | ({"taylor"} if "superres" in parts else set())
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}     # read late: parts may run apart
    rows = [r for r in old["rows"] if r["part"] not in owned] + new
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "quick": args.quick}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "newton.md").write_text(write_markdown(rows, meta))


if __name__ == "__main__":
    main()
