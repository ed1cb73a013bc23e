"""The Laplacians every regulariser is built on: grid, mesh and kNN graph.

Convention: every Laplacian here is the positive semi-definite `L = -Delta` (stiffness form, no
mass matrix), so the diffusion energy is `u^T L u >= 0` and constants are in the null space.

* Grids: `grid_laplacian(shape, spacing)` (sparse, 4-/6-neighbourhood, Neumann boundary) and the
  matrix-free `grid_laplacian_apply(u, spacing)` on `(C, *S)` fields; `u^T L u` equals the sum
  of squared forward differences `((u[i+1] - u[i]) / h)^2` over all grid edges.
* Meshes: `mesh_laplacian(vertices, faces, kind)` with kinds in `LAPLACIANS` (cotangent weights
  `(cot a + cot b) / 2`, or the uniform graph Laplacian), `mesh_mass` (lumped barycentric areas).
* Point clouds: `knn_laplacian(points, k, sigma)`, symmetrised kNN graph with Gaussian weights.

Displacement fields are `(d, *S)` with `d = len(S)`; component `i` moves along spatial axis `i`
of `S` (array index order), in the physical units of `spacing`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError
from shapeflow.kernels.exp import fast_exp

Spacing = Optional[Union[float, Sequence[float]]]


def as_spacing(func: str, spacing: Spacing, ndim: int) -> list[float]:
    if spacing is None:
        return [1.0] * ndim
    if isinstance(spacing, (int, float)):
        values = [float(spacing)] * ndim
    else:
        values = [float(s) for s in spacing]
    if len(values) != ndim or any(not (s > 0) for s in values):
        raise ShapeflowError(
            f"{func}(): spacing must be {ndim} positive numbers (one per spatial axis), got {spacing!r}"
        )
    return values


def check_grid_field(func: str, u: Tensor, components: Optional[bool] = None) -> None:
    if not isinstance(u, Tensor) or u.dim() not in (3, 4):
        raise ShapeflowError(
            f"{func}(): expected a field of shape (C, H, W) or (C, D, H, W), got "
            f"{tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__}"
        )
    if components and u.shape[0] != u.dim() - 1:
        raise ShapeflowError(
            f"{func}(): a displacement field (d, *S) needs d == len(S) = {u.dim() - 1}, got d = {u.shape[0]}"
        )


# ----------------------------------------------------------------------------- grid Laplacian


def grid_laplacian_apply(u: Tensor, spacing: Spacing = None) -> Tensor:
    """Matrix-free `L u` with the grid Laplacian `L = -Delta` (Neumann boundary) per channel.

    u: (C, *S) with S 2D (H, W) or 3D (D, H, W); spacing: one number or one per spatial axis.
    Returns (C, *S). `(L u)_i = sum_axes (2 u_i - u_{i-1} - u_{i+1}) / h^2`, a missing neighbour
    at the border replaced by `u_i` itself. Differentiable; matches `grid_laplacian(S, spacing)`.
    Without autograd the field is processed in cache-sized slabs (see `grid_laplacian_slab`).
    """
    check_grid_field("grid_laplacian_apply", u)
    weights = [1.0 / h**2 for h in as_spacing("grid_laplacian_apply", spacing, u.dim() - 1)]
    if torch.is_grad_enabled() and u.requires_grad:
        return grid_laplacian_slab(u, weights, 0, u.shape[1])
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    for start, stop in grid_slabs(u.shape):
        grid_laplacian_slab(u, weights, start, stop, out=out[:, start:stop])
    return out


# Elements (all channels) per slab of the blocked stencil: the slab of u, its output and the
# operands fused with it stay in a core's L2/L3 cache, so the ~10 elementwise passes of the
# stencil read main memory about once.
SLAB_ELEMENTS = 1 << 19


def grid_slabs(shape: Sequence[int], elements: Optional[int] = None) -> list[tuple[int, int]]:
    """Split the first spatial axis of a (C, *S) field into `[start, stop)` slabs of about
    `elements` (default `SLAB_ELEMENTS`)."""
    plane = math.prod(shape) // shape[1]
    step = max(1, (SLAB_ELEMENTS if elements is None else elements) // max(plane, 1))
    return [(i, min(i + step, shape[1])) for i in range(0, shape[1], step)]


def grid_laplacian_slab(
    u: Tensor, weights: Sequence[float], start: int, stop: int, *, center: float = 0.0,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Rows `start:stop` (first spatial axis) of `(L + center I) u`, L the Neumann grid Laplacian.

    u: (C, *S); weights: 1 / h^2 per spatial axis; out: (C, stop - start, *S[1:]) to write into
    (no autograd), or None for a new, differentiable tensor. Reads the halo rows start - 1 and
    stop of u. This is the one implementation of the stencil; `grid_laplacian_apply` loops it.
    """
    n0 = u.shape[1]
    us = u[:, start:stop]
    scale = 2.0 * sum(weights) + center
    out = us * scale if out is None else torch.mul(us, scale, out=out)
    w = weights[0]
    if n0 == 1:
        out.sub_(us, alpha=2.0 * w)
    else:  # neighbours along the slab axis, from the halo rows; Neumann at the two ends
        if start > 0:
            out.sub_(u[:, start - 1 : stop - 1], alpha=w)
        else:
            out[:, 1:].sub_(u[:, : stop - 1], alpha=w)
            out[:, :1].sub_(u[:, :1], alpha=w)
        if stop < n0:
            out.sub_(u[:, start + 1 : stop + 1], alpha=w)
        else:
            out[:, :-1].sub_(u[:, start + 1 :], alpha=w)
            out[:, -1:].sub_(u[:, -1:], alpha=w)
    for axis, w in enumerate(weights[1:], start=2):
        n = u.shape[axis]
        if n == 1:
            out.sub_(us, alpha=2.0 * w)
            continue
        out.narrow(axis, 0, n - 1).sub_(us.narrow(axis, 1, n - 1), alpha=w)  # neighbour i + 1
        out.narrow(axis, 1, n - 1).sub_(us.narrow(axis, 0, n - 1), alpha=w)  # neighbour i - 1
        out.narrow(axis, 0, 1).sub_(us.narrow(axis, 0, 1), alpha=w)  # Neumann at the borders
        out.narrow(axis, n - 1, 1).sub_(us.narrow(axis, n - 1, 1), alpha=w)
    return out


def grid_laplacian(
    shape: Sequence[int],
    spacing: Spacing = None,
    *,
    components: int = 1,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
) -> Tensor:
    """Assembled grid Laplacian `L = -Delta` (Neumann) as a sparse COO matrix.

    shape: spatial size S, 2D or 3D; spacing: per axis. Rows follow `u.reshape(C, -1)` (C order).
    components: c > 1 gives the block-diagonal `kron(I_c, L)` for a flattened `(c, *S)` field.
    Returns (c N, c N) with N = prod(S).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ShapeflowError(f"grid_laplacian(): shape must be 2 or 3 positive sizes, got {shape}")
    if components < 1:
        raise ShapeflowError(f"grid_laplacian(): components must be >= 1, got {components}")
    weights = [1.0 / h**2 for h in as_spacing("grid_laplacian", spacing, len(shape))]
    n = math.prod(shape)
    index = torch.arange(n, device=device).reshape(shape)
    rows, cols, vals = [], [], []
    for axis, w in enumerate(weights):
        if shape[axis] < 2:
            continue
        i = index.narrow(axis, 0, shape[axis] - 1).reshape(-1)
        j = index.narrow(axis, 1, shape[axis] - 1).reshape(-1)
        ones = torch.full(i.shape, w, dtype=dtype, device=device)
        rows += [i, j, i, j]
        cols += [i, j, j, i]
        vals += [ones, ones, -ones, -ones]
    if not rows:
        return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=dtype),
                                       (components * n,) * 2).coalesce()
    r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    offsets = torch.arange(components, device=device).repeat_interleave(r.numel()) * n
    r = r.repeat(components) + offsets
    c = c.repeat(components) + offsets
    v = v.repeat(components)
    return torch.sparse_coo_tensor(torch.stack([r, c]), v, (components * n,) * 2, check_invariants=False).coalesce()


# ----------------------------------------------------------------------------- mesh / cloud Laplacians


def _check_mesh(func: str, vertices: Tensor, faces: Tensor) -> None:
    if vertices.dim() != 2 or vertices.shape[1] != 3:
        raise ShapeflowError(f"{func}(): vertices must be (N, 3), got {tuple(vertices.shape)}")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ShapeflowError(f"{func}(): faces must be (F, 3), got {tuple(faces.shape)}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]):
        raise ShapeflowError(f"{func}(): faces index vertices outside [0, {vertices.shape[0]})")


def _from_weights(i: Tensor, j: Tensor, w: Tensor, n: int) -> Tensor:
    """`L = D - W` from symmetric edge weights listed once per (i, j) occurrence."""
    rows = torch.cat([i, j, i, j])
    cols = torch.cat([j, i, i, j])
    vals = torch.cat([-w, -w, w, w])
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=False).coalesce()


def cotangent_laplacian(vertices: Tensor, faces: Tensor) -> Tensor:
    """Cotangent Laplacian: `L_ij = -(cot a_ij + cot b_ij) / 2`, `L_ii = -sum_j L_ij`.

    vertices: (N, 3); faces: (F, 3) long. Returns sparse (N, N), PSD, differentiable in vertices.
    Approximates `M (-Delta)` with M the lumped mass (`mesh_mass`).
    """
    _check_mesh("cotangent_laplacian", vertices, faces)
    faces = faces.long()
    v = vertices[faces]  # (F, 3 corners, 3)
    i, j, k = faces.unbind(1)
    cot = []
    for a in range(3):  # angle at corner a is opposite the edge (a+1, a+2)
        e1 = v[:, (a + 1) % 3] - v[:, a]
        e2 = v[:, (a + 2) % 3] - v[:, a]
        cross = torch.linalg.vector_norm(torch.linalg.cross(e1, e2), dim=1)
        cot.append((e1 * e2).sum(1) / cross.clamp_min(1e-12))
    # edge (j, k) opposite corner i, etc.
    ei = torch.cat([j, k, i])
    ej = torch.cat([k, i, j])
    w = 0.5 * torch.cat(cot)
    return _from_weights(ei, ej, w, vertices.shape[0])


def uniform_laplacian(vertices: Tensor, faces: Tensor) -> Tensor:
    """Uniform graph Laplacian of the mesh edges: `L = D - A` with A the 0/1 adjacency.

    vertices: (N, 3) (only N is used); faces: (F, 3). Returns sparse (N, N).
    """
    _check_mesh("uniform_laplacian", vertices, faces)
    faces = faces.long()
    n = vertices.shape[0]
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = torch.unique(torch.sort(edges, dim=1).values, dim=0)
    w = torch.ones(edges.shape[0], dtype=vertices.dtype, device=vertices.device)
    return _from_weights(edges[:, 0], edges[:, 1], w, n)


LAPLACIANS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cotangent": cotangent_laplacian,
    "uniform": uniform_laplacian,
}


def mesh_laplacian(vertices: Tensor, faces: Tensor, kind: str = "cotangent") -> Tensor:
    """Mesh Laplacian chosen by name from `LAPLACIANS`. vertices (N, 3), faces (F, 3) -> sparse (N, N)."""
    if kind not in LAPLACIANS:
        raise ShapeflowError(f"mesh_laplacian(): unknown kind {kind!r}; valid names: {sorted(LAPLACIANS)}")
    return LAPLACIANS[kind](vertices, faces)


def mesh_mass(vertices: Tensor, faces: Tensor) -> Tensor:
    """Lumped (barycentric) mass: a third of the area of each incident face. Returns (N,)."""
    _check_mesh("mesh_mass", vertices, faces)
    faces = faces.long()
    v = vertices[faces]
    area = 0.5 * torch.linalg.vector_norm(torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), dim=1)
    out = torch.zeros(vertices.shape[0], dtype=vertices.dtype, device=vertices.device)
    return out.index_add(0, faces.reshape(-1), (area / 3.0).repeat_interleave(3))


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Unit vertex normals `(N, 3)`: the area-weighted sum of the incident triangles' normals
    (zero for a vertex in no triangle)."""
    _check_mesh("vertex_normals", vertices, faces)
    faces = faces.long()
    v = vertices[faces]
    n = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])              # (F, 3), |n| = 2 area
    out = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), n.repeat_interleave(3, dim=0))
    return out / torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min(1e-30)


def knn_laplacian(points: Tensor, k: int, sigma: Optional[float] = None) -> Tensor:
    """Graph Laplacian of the symmetrised k-nearest-neighbour graph with Gaussian weights.

    points: (N, d); k: neighbours per point (excluding itself); sigma: kernel width, default
    the mean distance to the k-th neighbour. Weight `w_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))`
    on every pair where j is among the k nearest of i or i among those of j. KD-tree via SciPy.
    Returns sparse (N, N), `L = D - W`.
    """
    from scipy.spatial import cKDTree

    if points.dim() != 2:
        raise ShapeflowError(f"knn_laplacian(): points must be (N, d), got {tuple(points.shape)}")
    n = points.shape[0]
    if not 1 <= k < n:
        raise ShapeflowError(f"knn_laplacian(): k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    pts = points.detach().cpu().double().numpy()
    dist, idx = cKDTree(pts).query(pts, k=k + 1)
    i = torch.arange(n).repeat_interleave(k)
    j = torch.as_tensor(idx[:, 1:].reshape(-1), dtype=torch.long)
    pairs = torch.unique(torch.sort(torch.stack([i, j], 1), dim=1).values, dim=0).to(points.device)
    if sigma is None:
        sigma = float(dist[:, -1].mean())
    if not sigma > 0:
        raise ShapeflowError(f"knn_laplacian(): sigma must be > 0, got {sigma}")
    d2 = ((points[pairs[:, 0]] - points[pairs[:, 1]]) ** 2).sum(1)
    w = fast_exp(-d2 / (2.0 * sigma**2))
    return _from_weights(pairs[:, 0], pairs[:, 1], w, n)


# ----------------------------------------------------------------------------- a shape's Laplacian

#: the Laplacians `shape_laplacian` builds by name ("auto": cotangent on a mesh, kNN on a cloud)
SHAPE_LAPLACIANS = ("auto", "cotangent", "uniform", "knn")


def shape_laplacian(points: Tensor, faces: Optional[Tensor] = None, kind: str = "auto",
                    k: int = 8) -> tuple[Tensor, Tensor]:
    """The scale-free Laplacian and the normalised mass of a mesh or a cloud, for per-point fields.

    points: (N, d); faces: (F, 3) triangles (a mesh) or None (a cloud); kind: "cotangent" or
    "uniform" (meshes, `mesh_laplacian`), "knn" (`knn_laplacian` with k neighbours, any shape),
    "auto" (cotangent for a mesh, kNN for a cloud). Returns `(L, m)`: L sparse (N, N) scaled so
    that the identity map's coordinates have energy d, `sum_c X_c^T L X_c = d` (so
    `diffusion(u, L)` approximates the mean squared gradient of u whatever the kind, the
    resolution or the units), and the lumped mass `m: (N,)` summing to 1 (mesh areas, or 1/N for
    a cloud). Bending is `u^T L diag(m)^-1 L u` (`bending_matrix`).
    """
    if kind not in SHAPE_LAPLACIANS:
        raise ShapeflowError(f"shape_laplacian(): unknown laplacian {kind!r}; valid names: {', '.join(SHAPE_LAPLACIANS)}")
    mesh = faces is not None and faces.numel() > 0 and faces.shape[-1] == 3 and points.shape[1] == 3
    if kind in ("cotangent", "uniform") and not mesh:
        raise ShapeflowError(f"shape_laplacian(): laplacian {kind!r} needs a triangle mesh; a point cloud takes 'knn'")
    if kind == "auto":
        kind = "cotangent" if mesh else "knn"
    n = points.shape[0]
    if kind == "knn":
        L = knn_laplacian(points, min(k, n - 1))
    else:
        L = mesh_laplacian(points, faces, kind)
    L = L.detach().to(points.dtype)
    total = float((points * (L @ points)).sum())
    if not total > 0:
        raise ShapeflowError("shape_laplacian(): the shape has no extent along its edges (all points coincide)")
    L = L * (points.shape[1] / total)
    return L.coalesce(), shape_mass(points, faces)


def shape_mass(points: Tensor, faces: Optional[Tensor] = None) -> Tensor:
    """The normalised lumped mass `(N,)` (sums to 1) of a mesh (`mesh_mass`, a third of each
    incident triangle's area; faces (F, 3)) or of a cloud (faces None: 1/N each)."""
    if faces is not None and faces.numel() > 0 and faces.shape[-1] == 3 and points.shape[1] == 3:
        mass = mesh_mass(points.detach(), faces)
        mass = mass.clamp_min(1e-12 * float(mass.max()))     # unreferenced vertices keep a tiny mass
    else:
        mass = torch.ones(points.shape[0], dtype=points.dtype, device=points.device)
    return mass / mass.sum()


def bending_matrix(L: Tensor, mass: Tensor) -> Tensor:
    """`L diag(mass)^-1 L` (sparse (N, N)): `u^T B u` is the bending energy `sum m (M^-1 L u)^2`
    with the Laplacian and mass of `shape_laplacian`."""
    import scipy.sparse as sp

    L = L.coalesce()
    (i, j), v = L.indices().cpu().numpy(), L.values().detach().cpu().double().numpy()
    A = sp.csr_matrix((v, (i, j)), shape=L.shape)
    B = (A @ sp.diags(1.0 / mass.detach().cpu().double().numpy()) @ A).tocoo()
    index = torch.as_tensor(np.stack([B.row, B.col]).astype(np.int64), device=L.device)
    return torch.sparse_coo_tensor(index, torch.as_tensor(B.data, dtype=L.dtype, device=L.device), L.shape,
                                   check_invariants=False).coalesce()
