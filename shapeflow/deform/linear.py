"""Rigid, similarity and affine maps in 2D or 3D: `phi(x) = x @ matrix.T + translation`.

Rotations are parameterised by the exponential of a skew-symmetric matrix (one angle in 2D,
an axis-angle vector in 3D), so every parameter vector is a valid rotation and t * params gives
the geodesic path used by `trajectory`.

The read-outs `rotation`, `translation`, `scale`, `matrix` (and `linear_part` of `Affine`) are
detached: `np.asarray` takes them. `translation` and `linear_part` are the fitted parameters
themselves (`parameters()` and the state dict keep their names; the read-out is a detached view,
so writing to it in place under `torch.no_grad()` still sets the parameter). The maps use the
differentiable `_translation()`, `_matrix()` internally.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ShapeflowError
from .base import Deformation, register_deformation

__all__ = ["Rigid", "Similarity", "Affine"]


def _check_dim(dim: int, who: str) -> int:
    if dim not in (2, 3):
        raise ShapeflowError(f"{who}: dim must be 2 or 3, got {dim}")
    return dim


def _skew(params: torch.Tensor, dim: int) -> torch.Tensor:
    """Skew-symmetric (d, d) matrix with `-params` above the diagonal (so in 2D a positive
    parameter turns counter-clockwise)."""
    out = params.new_zeros(dim, dim)
    rows, cols = torch.triu_indices(dim, dim, offset=1)
    return out.index_put((rows, cols), -params).index_put((cols, rows), params)


def _rotation(params: torch.Tensor, dim: int) -> torch.Tensor:
    """`exp(skew(params))`, a (d, d) rotation, evaluated in float64 for accuracy."""
    return torch.linalg.matrix_exp(_skew(params.double(), dim)).to(params.dtype)


def _rotation_log(rotation: torch.Tensor) -> torch.Tensor:
    """The parameters `(d (d - 1) / 2,)` whose `_rotation` is `rotation: (d, d)` (a proper
    rotation), float64, angle in [0, pi]: atan2 in 2D; in 3D the axis-angle of the unit
    quaternion (Shepperd's largest-component choice, accurate at every angle, pi included)."""
    R = rotation.double()
    if R.shape[0] == 2:
        return torch.atan2(R[1, 0], R[0, 0]).reshape(1)
    trace = R.diagonal().sum()
    # 4 q_k^2 for k = w, x, y, z; build the quaternion from the largest for accuracy
    squares = torch.stack([1 + trace, 1 + 2 * R[0, 0] - trace, 1 + 2 * R[1, 1] - trace, 1 + 2 * R[2, 2] - trace])
    k = int(squares.argmax())
    pairs = torch.stack([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1],     # 4 w x, 4 w y, 4 w z
                         R[0, 1] + R[1, 0], R[0, 2] + R[2, 0], R[1, 2] + R[2, 1]])    # 4 x y, 4 x z, 4 y z
    products = {0: (squares[0], pairs[0], pairs[1], pairs[2]), 1: (pairs[0], squares[1], pairs[3], pairs[4]),
                2: (pairs[1], pairs[3], squares[2], pairs[5]), 3: (pairs[2], pairs[4], pairs[5], squares[3])}[k]
    q = torch.stack(products) / (2 * squares[k].clamp_min(0).sqrt())               # (w, x, y, z), |q| = 1
    q = q * torch.sign(q[0]) if q[0] != 0 else q
    vector = q[1:]
    angle = 2 * torch.atan2(vector.norm(), q[0])
    w = vector * (angle / vector.norm()) if vector.norm() > 0 else torch.zeros_like(vector)
    return torch.stack([w[2], -w[1], w[0]])          # the order of `_skew`'s lower triangle


class _DetachedParameter:
    """A class attribute that reads the registered parameter of the same name as a detached view
    (the parameter itself stays in `parameters()` and the state dict under that name)."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        try:
            return obj._parameters[self.name].detach()
        except KeyError:  # not registered (yet): let nn.Module's lookup report it
            raise AttributeError(self.name) from None


@register_deformation
class Rigid(Deformation):
    """Rotation and translation. `rotation: (d, d)`, `translation: (d,)`, `scale` = 1."""

    linear = True
    default_lr = 2e-2
    fitted_by = "procrustes"
    #: the closed-form step of the "procrustes" fitter (`pipelines/shape_linear.py`, `STEPS`)
    closed_form: ClassVar[str] = "rigid"
    translation = _DetachedParameter("The translation `(d,)` (detached).")

    def __init__(self, dim: int = 3):
        super().__init__()
        self.dim = _check_dim(dim, type(self).__name__)
        self.rotation_params = nn.Parameter(torch.zeros(dim * (dim - 1) // 2))
        self.translation = nn.Parameter(torch.zeros(dim))

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def _translation(self) -> torch.Tensor:
        """The translation parameter `(d,)` itself (differentiable)."""
        return self._parameters["translation"]

    def _log_scale(self) -> torch.Tensor:
        return self._translation().new_zeros(())

    def _rotation_matrix(self) -> torch.Tensor:
        return _rotation(self.rotation_params, self.dim)

    def _matrix(self) -> torch.Tensor:
        return self._log_scale().exp() * self._rotation_matrix()

    @property
    def rotation(self) -> torch.Tensor:
        """The rotation matrix `(d, d)` (detached)."""
        return self._rotation_matrix().detach()

    @property
    def scale(self) -> torch.Tensor:
        """The isotropic scale factor (a detached 0-d tensor; 1 for `Rigid`)."""
        return self._log_scale().detach().exp()

    @property
    def matrix(self) -> torch.Tensor:
        """The linear part `(d, d)`: scale * rotation (detached)."""
        return self._matrix().detach()

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """`points: (N, d) -> points @ matrix.T + translation: (N, d)`, computed in the map's dtype
        and returned in the points' (a float64 map keeps a large world offset exact)."""
        return (points.to(self.dtype) @ self._matrix().T + self._translation()).to(points.dtype)

    def input_dtype(self, given: torch.dtype) -> torch.dtype:
        """NumPy points keep float64 (world coordinates far from the origin)."""
        return torch.float64 if given == torch.float64 else self.dtype

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """Along the geodesic: rotation angle, log-scale and translation grow linearly in t.
        `points: (N, d)` -> `(steps + 1, N, d)`."""
        frames, x = [], points.to(self.dtype)
        for t in torch.linspace(0, 1, steps + 1).tolist():
            rot = _rotation(t * self.rotation_params, self.dim)
            frames.append(x @ (torch.exp(t * self._log_scale()) * rot).T + t * self._translation())
        return torch.stack(frames).to(points.dtype)

    def inverse(self, points: torch.Tensor) -> torch.Tensor:
        """`phi^{-1}(points)`: `(N, d) -> (N, d)`."""
        x = points.to(self.dtype) - self._translation()
        return torch.linalg.solve(self._matrix(), x.T).T.to(points.dtype)

    def conjugated(self, source_center: torch.Tensor, target_center: torch.Tensor, scale: float):
        """The same map expressed in world units: `x -> scale * phi((x - c_s) / scale) + c_t`.
        `source_center`, `target_center`: `(d,)` tensors or arrays.

        Used to undo the normalisation applied before fitting; the linear part is unchanged.
        """
        source_center, target_center = (torch.as_tensor(c, dtype=self.dtype, device=self.device)
                                        for c in (source_center, target_center))
        out = copy.deepcopy(self)
        with torch.no_grad():
            out._translation().copy_(target_center + scale * self._translation() - source_center @ self._matrix().T)
        return out

    def set_matrix(self, matrix: torch.Tensor, translation: torch.Tensor) -> None:
        """Set the parameters so that `phi(x) = x @ matrix.T + translation`: `matrix: (d, d)` a
        proper rotation here (times a positive scale for `Similarity`, any invertible matrix for
        `Affine`), `translation: (d,)`. In place, without autograd."""
        matrix = torch.as_tensor(matrix, dtype=torch.float64)
        det = float(torch.linalg.det(matrix))
        if not det > 0:
            raise ShapeflowError(f"{type(self).__name__}.set_matrix(): matrix must be a rotation (times a scale), "
                                 f"with a positive determinant; got determinant {det:.6g}")
        scale = torch.tensor(det, dtype=torch.float64) ** (1.0 / self.dim)
        self._set_linear(matrix / scale, scale)
        with torch.no_grad():
            self._translation().copy_(torch.as_tensor(translation, dtype=self.dtype, device=self.device))

    def _set_linear(self, rotation: torch.Tensor, scale: torch.Tensor) -> None:
        if abs(float(scale) - 1.0) > 1e-6:
            raise ShapeflowError(f"{type(self).__name__}.set_matrix(): matrix must be a rotation, "
                                 f"its scale is {float(scale):.6g}")
        with torch.no_grad():
            self.rotation_params.copy_(_rotation_log(rotation).to(self.rotation_params))


@register_deformation
class Similarity(Rigid):
    """Rotation, isotropic scale and translation."""

    def __init__(self, dim: int = 3):
        super().__init__(dim)
        self.log_scale = nn.Parameter(torch.zeros(()))

    closed_form = "similarity"

    def _log_scale(self) -> torch.Tensor:
        return self.log_scale

    def _set_linear(self, rotation: torch.Tensor, scale: torch.Tensor) -> None:
        with torch.no_grad():
            self.rotation_params.copy_(_rotation_log(rotation).to(self.rotation_params))
            self.log_scale.copy_(scale.log().to(self.log_scale))


@register_deformation
class Affine(Rigid):
    """A general linear map plus translation. `matrix: (d, d)` is a free parameter."""

    def __init__(self, dim: int = 3):
        Deformation.__init__(self)
        self.dim = _check_dim(dim, type(self).__name__)
        self.linear_part = nn.Parameter(torch.eye(dim))
        self.translation = nn.Parameter(torch.zeros(dim))

    closed_form = "affine"
    linear_part = _DetachedParameter("The linear part `(d, d)` (detached; the same as `matrix`).")

    def set_matrix(self, matrix: torch.Tensor, translation: torch.Tensor) -> None:
        """Set `phi(x) = x @ matrix.T + translation` (`matrix: (d, d)`, `translation: (d,)`), in place."""
        with torch.no_grad():
            self._parameters["linear_part"].copy_(torch.as_tensor(matrix, dtype=self.dtype, device=self.device))
            self._translation().copy_(torch.as_tensor(translation, dtype=self.dtype, device=self.device))

    def _matrix(self) -> torch.Tensor:
        return self._parameters["linear_part"]

    def _rotation_matrix(self) -> torch.Tensor:
        """The rotation of the polar decomposition `matrix = rotation @ stretch`."""
        u, _, vh = torch.linalg.svd(self._matrix())
        d = torch.sign(torch.linalg.det(u @ vh))
        u = torch.cat([u[:, :-1], u[:, -1:] * d], dim=1)
        return u @ vh

    @property
    def rotation(self) -> torch.Tensor:
        """The rotation `(d, d)` of the polar decomposition `matrix = rotation @ stretch` (detached)."""
        return self._rotation_matrix().detach()

    @property
    def scale(self) -> torch.Tensor:
        """The geometric-mean scale `|det matrix|^(1/d)` (a detached 0-d tensor)."""
        return torch.linalg.det(self.matrix).abs() ** (1.0 / self.dim)

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """The straight path from `x` to `phi(x)`: `points: (N, d)` -> `(steps + 1, N, d)`."""
        return Deformation.trajectory(self, points, steps)
