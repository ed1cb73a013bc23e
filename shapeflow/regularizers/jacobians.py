"""Jacobian determinants of displacement fields and the folding statistics reported for them."""
from __future__ import annotations

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError
from shapeflow.regularizers.laplacians import Spacing, as_spacing, check_grid_field

__all__ = ["jacobian_determinant", "folding_statistics"]



def jacobian_determinant(u: Tensor, spacing: Spacing = None) -> Tensor:
    """Determinant of the Jacobian of `x -> x + u(x)`, `det(I + grad u)`, at every voxel.

    u: (d, *S) displacement field, d = len(S) in {2, 3}, in the units of `spacing`.
    Derivatives by central differences (one-sided at the borders, `torch.gradient`), exact for
    affine fields. Returns (*S).
    """
    check_grid_field("jacobian_determinant", u, components=True)
    d = u.shape[0]
    h = as_spacing("jacobian_determinant", spacing, d)
    J = [[None] * d for _ in range(d)]
    for i in range(d):
        grads = torch.gradient(u[i], spacing=h, dim=list(range(d)))
        for j in range(d):
            J[i][j] = grads[j] + (1.0 if i == j else 0.0)
    if d == 2:
        return J[0][0] * J[1][1] - J[0][1] * J[1][0]
    return (
        J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
        - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
        + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0])
    )


def folding_statistics(detJ: Tensor, eps: float = 1e-9) -> dict[str, float]:
    """Folding summary of a Jacobian-determinant map detJ: (*S).

    Returns {"percent_negative": 100 * fraction of voxels with detJ <= 0, "min": min detJ,
    "std_log": standard deviation of log(clip(detJ, eps))}.
    """
    flat = detJ.detach().reshape(-1).double()
    if flat.numel() == 0:
        raise ShapeflowError("folding_statistics(): detJ is empty")
    return {
        "percent_negative": float((flat <= 0).double().mean() * 100.0),
        "min": float(flat.min()),
        "std_log": float(torch.log(flat.clamp_min(eps)).std(unbiased=False)),
    }
