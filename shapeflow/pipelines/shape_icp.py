"""Non-rigid ICP: per-point displacements on a mesh or a cloud, fitted by Gauss-Newton on the shared core.

The unknown is one displacement per source point, `u: (N, d)`, and the objective (normalised
coordinates, correspondences found anew at every evaluation)

    F(u) = 1/2 sum_i a_i |x_i + u_i - y_p(i)|^2                 source -> closest target point
         + 1/2 sum_j b_j |x_q(j) + u_q(j) - y_j|^2              target -> closest moved source point
         + 1/2 t sum_i a_i (n_p(i) . (x_i + u_i - y_p(i)))^2    point to plane (meshes, optional)
         + 1/2 w/K sum_k |sum_a B_ka (x_a + u_a) - z_k|^2       landmarks
         + 1/2 lam (u^T L u + beta u^T L M^-1 L u)              diffusion (+ bending)

with `a`, `b` the normalised lumped masses of source and target (1/N on a cloud), pairs rejected
when farther than `reject` times their median distance or, on meshes, when their normals differ
by more than `normal_angle`, `L`, `M` the scale-free Laplacian and mass of
`shapeflow.regularizers.shape_laplacian` (cotangent on a mesh, kNN on a cloud), and `B` the
interpolation weights tying each source landmark to its enclosing triangle / nearest points
(`shapeflow.deform.vertex.interpolation_weights`, the same weights the fitted map uses).

Each stage is one `minimize_least_squares` run (the Gauss-Newton loop of the image pipeline) at a
fixed stiffness `lam`; its normal equations `(J^T J + lam L + ...) du = -g` have one d x d block
per point plus the sparse couplings (`sparse_normal_operator`), solved by `conjugate_gradient`
(matrix-free with Jacobi, or assembled with an AMG preconditioner). The stiffness is annealed
from `stiffness * regularization` down to `regularization` over `stages` stages (the schedule of
Amberg et al.'s non-rigid ICP). Above `coarse_points` points the schedule first runs on a
farthest-point subsample with a kNN Laplacian; the coarse field is prolongated to every point by
the Laplacian (the smoothest field agreeing with it at the sampled points) and the last two
stages run at full resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._registry import Registry
from ..deform.vertex import interpolation_weights
from ..errors import ShapeflowError
from ..kernels import PointIndex
from ..losses.points import PairWeights, bounding_volume
from ..progress import progress_bar
from ..regularizers import bending_matrix, shape_laplacian, shape_mass, vertex_normals
from ..sampling import farthest_point_sample
from ..solvers import Linearization, conjugate_gradient, minimize_least_squares, sparse_normal_operator
from ..solvers.normal.sparse import assemble_sparse_normal_matrix

__all__ = ["IcpProblem", "PairTerm", "LandmarkTerm", "fit_point_displacement", "PRECONDITIONERS", "PAIRINGS"]

#: the preconditioners of the inner CG
PRECONDITIONERS = Registry("preconditioner", {"auto": "auto", "factor": "factor", "jacobi": "jacobi", "amg": "amg"})
#: "auto" factorises (on the CPU) up to this many points per level, and uses Jacobi above or on a GPU
FACTOR_MAX_POINTS = 60000
#: CG iterations per Gauss-Newton step at most: a truncated step is still a descent direction, and
#: the next step (with fresh correspondences) goes on from it
CG_MAXITER = 300
#: a step whose CG took more iterations than this refactorises the preconditioner for the next one
REFACTOR_AFTER = 10
#: Gauss-Newton iterations per stiffness stage when `iterations` is not given
STAGE_ITERATIONS = 10
#: the preconditioner's ridge, relative to its largest entry (keeps its LU regular)
RIDGE = 1e-10


#: the pairings (`PointLoss.pairing`) the point field's Gauss-Newton fit takes
PAIRINGS = ("closest", "corresponding")


@dataclass
class PairTerm:
    """How the data term pairs points: "closest" (`loss="chamfer"`: both ways, or one way by
    `sides` = (source -> target, target -> source)) or "corresponding" (point i with point i,
    `loss="l2"`), with the options that filter pairs and the loss's robust `PairWeights` (trim,
    reach, outliers; applied to each direction's pairs after the filters)."""

    pairing: str = "closest"
    reject: float | None = None
    normal_angle: float | None = 60.0
    point_to_plane: float = 0.0
    sides: tuple[bool, bool] = (True, True)
    robust: PairWeights = PairWeights()


@dataclass
class LandmarkTerm:
    """`1/2 w/K sum_k |sum_a B_ka p_a - z_k|^2` on the moved source points p = x + u, as
    `matrix = w/K B^T B` (N, N) sparse, `rhs = w/K B^T z` (N, d) and `constant = w/K |z|^2`."""

    matrix: Tensor
    rhs: Tensor
    constant: float

    @classmethod
    def build(cls, x: Tensor, faces: Tensor | None, source: Tensor, target: Tensor, weight: float) -> "LandmarkTerm":
        """Landmarks `source: (K, d)` tied to the points `x: (N, d)` (and faces) by
        `interpolation_weights`, `target: (K, d)` where they should go, `weight` w."""
        near, w = interpolation_weights(x, faces, source)                         # (K, k)
        K, k = near.shape
        scale = weight / K
        rows = near[:, :, None].expand(K, k, k).reshape(-1)
        cols = near[:, None, :].expand(K, k, k).reshape(-1)
        values = (scale * w[:, :, None] * w[:, None, :]).reshape(-1)
        n = x.shape[0]
        matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=False).coalesce()
        rhs = torch.zeros_like(x).index_add(0, near.reshape(-1), scale * (w[:, :, None] * target[:, None, :]).reshape(-1, x.shape[1]))
        return cls(matrix, rhs, float(scale * target.square().sum()))

    def cost(self, moved: Tensor) -> float:
        return 0.5 * float((moved * (self.matrix @ moved)).sum()) - float((self.rhs * moved).sum()) + 0.5 * self.constant

    def gradient(self, moved: Tensor) -> Tensor:
        return self.matrix @ moved - self.rhs


class IcpProblem:
    """`F(u)` of the module docstring at one stiffness, as a `LeastSquaresProblem` in `u: (N, d)`.

    x: (N, d) source points; y: (M, d) target; source_faces / target_faces: (F, 3) or None;
    regularizer: (N, N) sparse `lam (L + beta L M^-1 L)`, acting on u per component;
    landmarks: None or `LandmarkTerm` (`w/K B^T B`, `w/K B^T z`, `w/K |z|^2`), acting on x + u.
    """

    def __init__(self, x: Tensor, y: Tensor, source_faces: Tensor | None, target_faces: Tensor | None,
                 pairs: PairTerm, regularizer: Tensor, landmarks: "LandmarkTerm | None" = None,
                 preconditioner: str = "auto", cg_tol: float = 1e-3, target_index: PointIndex | None = None):
        self.x, self.y = x, y
        self.source_faces, self.target_faces = source_faces, target_faces
        self.pairs = pairs
        self.regularizer = regularizer.coalesce()
        self.landmarks = landmarks
        self.coupling = self.regularizer if landmarks is None else (self.regularizer + landmarks.matrix).coalesce()
        self.cg_tol = cg_tol
        self.source_mass = shape_mass(x, source_faces)
        self.target_mass = shape_mass(y, target_faces)
        self.target_normals = vertex_normals(y, target_faces) if target_faces is not None else None
        self.target_index = target_index or (PointIndex(y) if pairs.pairing == "closest" else None)
        self.volume = bounding_volume(y)
        self._factor = None
        if preconditioner == "auto":
            small = len(x) <= FACTOR_MAX_POINTS and x.device.type == "cpu"
            preconditioner = "factor" if small else "jacobi"     # the LU is SciPy's, on the host
        self.preconditioner = preconditioner

    # --- correspondences and the cost ------------------------------------------------------
    def _filter(self, weights: Tensor, distances: Tensor, normal_dots: Tensor | None, side: bool
                ) -> tuple[Tensor, float]:
        """One direction's pair weights after the filters and the robust weights, and the cost
        of its capped pairs (`reach`); all zero for a direction the loss leaves out."""
        if not side:
            return torch.zeros_like(weights), 0.0
        keep = torch.ones_like(weights, dtype=torch.bool)
        if self.pairs.reject is not None and len(distances):
            keep &= distances <= self.pairs.reject * distances.median().clamp_min(1e-12)
        if normal_dots is not None and self.pairs.normal_angle is not None:
            keep &= normal_dots >= math.cos(math.radians(self.pairs.normal_angle))
        weights = weights * keep
        if not self.pairs.robust.active:
            return weights, 0.0
        weights, constant = self.pairs.robust(distances.square(), weights, self.volume, self.x.shape[1])
        return weights, float(constant)

    def correspondences(self, u: Tensor) -> dict[str, Tensor]:
        """The pairs at `x + u`: `source_pairs (N,)` into y with weights `a (N,)`, `target_pairs (M,)`
        into x with weights `b (M,)` (empty for corresponding points), and the target normals at the
        source's pairs `(N, d)` (None without a target mesh)."""
        moved = self.x + u
        if self.pairs.pairing == "corresponding":
            index = torch.arange(len(self.x), device=u.device)
            empty = torch.zeros(0, dtype=torch.long, device=u.device)
            return {"source_pairs": index, "a": self.source_mass, "target_pairs": empty,
                    "b": torch.zeros(0, dtype=u.dtype, device=u.device), "normals": None}
        dist_s, near_s = self.target_index.query(moved, 1)
        dist_t, near_t = PointIndex(moved).query(self.y, 1)
        near_s, near_t = near_s[:, 0], near_t[:, 0]
        dots_s = dots_t = None
        if self.source_faces is not None and self.target_normals is not None:
            moved_normals = vertex_normals(moved, self.source_faces)
            dots_s = (moved_normals * self.target_normals[near_s]).sum(1)
            dots_t = (moved_normals[near_t] * self.target_normals).sum(1)
        a, capped_s = self._filter(self.source_mass, dist_s[:, 0], dots_s, self.pairs.sides[0])
        b, capped_t = self._filter(self.target_mass, dist_t[:, 0], dots_t, self.pairs.sides[1])
        normals = self.target_normals[near_s] if self.target_normals is not None else None
        return {"source_pairs": near_s, "a": a, "target_pairs": near_t, "b": b, "normals": normals,
                "capped": 0.5 * (capped_s + capped_t)}

    def _data_residuals(self, u: Tensor, pairs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        moved = self.x + u
        r_source = moved - self.y[pairs["source_pairs"]]                         # (N, d)
        if not len(pairs["target_pairs"]):                                      # corresponding points
            return r_source, moved[:0]
        r_target = moved[pairs["target_pairs"]] - self.y                         # (M, d)
        return r_source, r_target

    def cost(self, u: Tensor) -> tuple[float, dict[str, Any]]:
        pairs = self.correspondences(u)
        value, terms = self._cost_terms(u, pairs)
        return value, {"pairs": pairs, "terms": terms}

    def _cost_terms(self, u: Tensor, pairs: dict[str, Tensor]) -> tuple[float, dict[str, float]]:
        r_source, r_target = self._data_residuals(u, pairs)
        data = 0.5 * float((pairs["a"] * r_source.square().sum(1)).sum()) + pairs.get("capped", 0.0)
        if len(r_target):
            data += 0.5 * float((pairs["b"] * r_target.square().sum(1)).sum())
        if self.pairs.point_to_plane and pairs["normals"] is not None:
            data += 0.5 * self.pairs.point_to_plane * float(
                (pairs["a"] * (pairs["normals"] * r_source).sum(1).square()).sum())
        regular = 0.5 * float((u * (self.regularizer @ u)).sum())
        if self.landmarks is not None:
            regular += self.landmarks.cost(self.x + u)
        return data + regular, {"data": data, "regular": regular}

    # --- the linearisation ----------------------------------------------------------------
    def _factored(self, blocks: Tensor, mu: float):
        """The "factor" preconditioner: `r -> A0^-1 r` per component, A0 = diag(tr(block) / d) +
        coupling + mu I the isotropic part of the normal matrix (SciPy's sparse LU, CPU). It is
        factorised at the stage's first step and kept: later steps change only the data weights on
        the diagonal, so it stays a close preconditioner (exact at the first step for
        point-to-point pairs, where CG takes one step), refactorised after a step that needed more
        than `REFACTOR_AFTER` CG iterations."""
        if self._factor is None:
            self._factor = self._factorise(blocks, mu)
        return self._factor

    def _factorise(self, blocks: Tensor, mu: float):
        import numpy as np
        import scipy.sparse as sp
        from scipy.sparse.linalg import splu

        n, d = self.x.shape
        C = self.coupling
        (i, j), v = C.indices().cpu().numpy(), C.values().detach().cpu().double().numpy()
        diag = (torch.diagonal(blocks, dim1=1, dim2=2).sum(1) / d + mu).detach().cpu().double().numpy()
        # a tiny ridge: points without data pairs (a direction, trim or reach left them out) on a
        # part of the kNN graph with none either leave the Laplacian's constants undetermined
        diag = diag + RIDGE * max(float(diag.max()), float(np.abs(v).max(initial=0.0)))
        A0 = (sp.csc_matrix((v, (i, j)), shape=(n, n)) + sp.diags(diag)).tocsc()
        lu = splu(A0, permc_spec="COLAMD")

        def apply(r: Tensor) -> Tensor:
            flat = r.reshape(n, d, -1).permute(0, 2, 1).reshape(n, -1)                  # (N, d k)
            out = lu.solve(np.ascontiguousarray(flat.detach().cpu().double().numpy()))
            out = torch.as_tensor(out, dtype=r.dtype, device=r.device).reshape(n, -1, d).permute(0, 2, 1)
            return out.reshape(r.shape)

        return apply

    def blocks(self, pairs: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """`J^T J` of the data term per point, `(N, d, d)`."""
        n, d = self.x.shape
        weight = pairs["a"].clone()
        if len(pairs["target_pairs"]):
            weight.index_add_(0, pairs["target_pairs"], pairs["b"])
        blocks = weight[:, None, None] * torch.eye(d, dtype=dtype, device=self.x.device)
        if self.pairs.point_to_plane and pairs["normals"] is not None:
            nn_ = pairs["normals"]
            blocks = blocks + self.pairs.point_to_plane * pairs["a"][:, None, None] * nn_[:, :, None] * nn_[:, None, :]
        return blocks

    def gradient(self, u: Tensor, pairs: dict[str, Tensor]) -> Tensor:
        """`dF/du` with the correspondences held fixed, `(N, d)`."""
        r_source, r_target = self._data_residuals(u, pairs)
        g = pairs["a"][:, None] * r_source
        if len(r_target):
            g = g.index_add(0, pairs["target_pairs"], pairs["b"][:, None] * r_target)
        if self.pairs.point_to_plane and pairs["normals"] is not None:
            nn_ = pairs["normals"]
            g = g + self.pairs.point_to_plane * (pairs["a"] * (nn_ * r_source).sum(1))[:, None] * nn_
        g = g + self.regularizer @ u
        if self.landmarks is not None:
            g = g + self.landmarks.gradient(self.x + u)
        return g

    def linearize(self, u: Tensor, state: dict[str, Any]) -> Linearization:
        pairs = state["pairs"]
        g = self.gradient(u, pairs)
        blocks = self.blocks(pairs, u.dtype)

        def solve(mu: float) -> tuple[Tensor, int]:
            if self.preconditioner == "amg":
                A = assemble_sparse_normal_matrix(blocks, self.coupling, lam=1.0, damping=mu)
                step, info = conjugate_gradient(A, -g.reshape(-1), M="amg", tol=self.cg_tol)
            else:
                op = sparse_normal_operator(blocks, self.coupling, lam=1.0, damping=mu)
                M = op.diagonal() if self.preconditioner == "jacobi" else self._factored(blocks, mu)
                step, info = conjugate_gradient(op, -g.reshape(-1), M=M, tol=self.cg_tol, maxiter=CG_MAXITER)
            iterations = int(torch.as_tensor(info.iterations).max())
            if iterations > REFACTOR_AFTER:      # the weights moved away from the factorised ones
                self._factor = None
            return step.reshape(u.shape), iterations

        return Linearization(gradient=g, solve=solve)


def _schedule(regularization: float, stiffness: float, stages: int) -> list[float]:
    """Stiffness per stage, geometric from `stiffness * regularization` down to `regularization`."""
    if stages == 1:
        return [regularization]
    return [regularization * stiffness ** (1 - s / (stages - 1)) for s in range(stages)]


def _regularizer(x: Tensor, faces: Tensor | None, options: Any) -> Tensor:
    """`L + beta L M^-1 L` of the source (the model's Laplacian), sparse (N, N)."""
    L, mass = shape_laplacian(x, faces, options.laplacian, options.neighbors)
    if options.bending:
        L = (L + options.bending * bending_matrix(L, mass)).coalesce()
    return L


def prolongate(x: Tensor, laplacian: Tensor, sampled: Tensor, coarse: Tensor,
               iterations: int = 200) -> Tensor:
    """Extend a field known at `x[sampled]` (`coarse: (n, d)`) to every point of `x: (N, d)`: the
    minimiser of `u^T L u + kappa sum_sampled |u_s - coarse_s|^2` (kappa large: the smoothest field
    through the coarse values), by CG from the coarse field's interpolation. Returns (N, d)."""
    start_index, start_weights = interpolation_weights(x[sampled], None, x)
    u0 = (start_weights[..., None] * coarse[start_index]).sum(1)
    d = x.shape[1]
    kappa = 1e3 * float(laplacian.values().abs().max())
    weight = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    weight[sampled] = kappa
    target = torch.zeros_like(x)
    target[sampled] = kappa * coarse
    blocks = weight[:, None, None] * torch.eye(d, dtype=x.dtype, device=x.device)
    op = sparse_normal_operator(blocks, laplacian, lam=1.0)
    u, _ = conjugate_gradient(op, target.reshape(-1), M=op.diagonal(), x0=u0.reshape(-1), tol=1e-6,
                              maxiter=iterations)
    return u.reshape(x.shape)


def fit_point_displacement(x: Tensor, y: Tensor, source_faces: Tensor | None, target_faces: Tensor | None,
                           options: Any, *, pairs: PairTerm, regularization: float, iterations: int | None,
                           landmarks: tuple[Tensor, Tensor, float] | None, progress: bool, history: list[dict],
                           prefix: str = "", seed: int = 0) -> tuple[Tensor, bool]:
    """Fit `u: (N, d)` moving `x: (N, d)` onto `y: (M, d)` (see the module docstring).

    options: `PointDisplacement.Options`; landmarks: `(source (K, d), target (K, d), weight)` in the
    same coordinates, or None. Appends one history row per Gauss-Newton iteration. Returns
    `(u, interrupted)`.
    """
    PRECONDITIONERS.lookup(options.preconditioner, "register()")
    dtype = x.dtype     # the fit runs in float64: the stiff early stages need it
    x, y = x.double(), y.double()
    landmarks = landmarks and (landmarks[0].double(), landmarks[1].double(), landmarks[2])
    if options.stages < 1 or options.stiffness < 1:
        raise ShapeflowError(f"register(): stages must be >= 1 and stiffness >= 1, got {options.stages}, "
                             f"{options.stiffness}")
    lambdas = _schedule(regularization, options.stiffness, options.stages)
    per_stage = iterations if iterations is not None else STAGE_ITERATIONS
    n = len(x)
    coarse = (options.coarse_points is not None and n > 1.5 * options.coarse_points and len(lambdas) > 2)
    target_index = PointIndex(y) if pairs.pairing == "closest" else None
    u = torch.zeros_like(x)
    with progress_bar(progress, f"{prefix}displacement (Gauss-Newton)", total=len(lambdas) * per_stage) as advance:
        if coarse:
            # isolated points (outliers) are not sampled: a farthest-point subsample takes them first
            sampled = farthest_point_sample(x, options.coarse_points, seed, skip_isolated=True)
            if pairs.pairing == "closest":
                chosen = farthest_point_sample(y, min(len(y), options.coarse_points), seed, skip_isolated=True)
                ys, t_index = y[chosen], None
            else:
                ys, t_index = y[sampled], None
            u_coarse, stopped = _run_stages(x[sampled], ys, None, None, options, pairs, lambdas[:-2], per_stage,
                                            landmarks, history, f"{prefix}coarse", advance, t_index)
            full_regularizer = _regularizer(x, source_faces, options)
            u = prolongate(x, full_regularizer, sampled, u_coarse)
            if stopped:
                return u.to(dtype), True
            fine_lambdas = lambdas[-2:]
        else:
            fine_lambdas = lambdas
        u, stopped = _run_stages(x, y, source_faces, target_faces, options, pairs, fine_lambdas, per_stage,
                                 landmarks, history, f"{prefix}fine", advance, target_index, u0=u)
        return u.to(dtype), stopped


def _run_stages(x, y, source_faces, target_faces, options, pairs: PairTerm, lambdas: list[float], per_stage: int,
                landmarks, history: list[dict], label: str, advance, target_index, u0: Tensor | None = None
                ) -> tuple[Tensor, bool]:
    """The stiffness stages on one level. Returns (u, interrupted)."""
    regularizer = _regularizer(x, source_faces, options)
    term = LandmarkTerm.build(x, source_faces, landmarks[0], landmarks[1], landmarks[2]) if landmarks else None
    u = torch.zeros_like(x) if u0 is None else u0
    for lam in lambdas:
        problem = IcpProblem(x, y, source_faces, target_faces, pairs, (lam * regularizer).coalesce(), term,
                             options.preconditioner, target_index=target_index)
        target_index = problem.target_index
        stage = f"{label} (stiffness {lam:.3g})"

        def report(step, stage=stage):
            terms = step.state["terms"]
            row = {"stage": stage, "phase": "gauss-newton", "iteration": len(history), "total": step.cost,
                   "data": terms["data"], "energy": terms["regular"], **({"diverged": True} if step.diverged else {})}
            history.append(row)
            advance(row)

        result = minimize_least_squares(problem, u, maxiter=per_stage, damping=0.0, line_search="armijo",
                                        max_halvings=6, ftol=1e-4, xtol=1e-6, callback=report)
        u = result.x
        if result.interrupted:
            return u, True
    return u, False
