"""ResNet-LDDMM: a residual network read as a forward-Euler flow (Amor, Arguillère, Shao 2021).

Block l moves every point by `dt * v_l(x)` with `v_l(x) = W3 act(W2 act(W1 x + b1) + b2)` and
`dt = 1 / L`, so L blocks integrate the flow equation `dx/dt = v(t, x)` from t = 0 to 1. The
kinetic energy of the discrete flow is `dt * sum_l mean_i |v_l(x_l,i)|^2` (the average over the
points keeps its weight independent of their number). With ReLU the map is bi-Lipschitz; the
smooth activations give a diffeomorphism.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InverseError, ShapeflowError
from ..regularizers import kinetic_energy
from .base import KineticFlow, register_deformation

__all__ = ["ResNetFlow", "ACTIVATIONS", "OutputLinearization"]

ACTIVATIONS = {"relu": nn.functional.relu, "tanh": torch.tanh, "softplus": nn.functional.softplus,
               "silu": nn.functional.silu}


def _silu_slope(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


#: the derivative of each activation at its argument z, given its value h = act(z) too (ReLU's is
#: sign(h), one operation: `(z > 0).to(dtype)` is two, and `linearize` takes 20 slopes a pass)
SLOPES = {"relu": lambda z, h: h.sign(), "tanh": lambda z, h: 1 - h.square(),
          "softplus": lambda z, h: torch.sigmoid(z), "silu": _silu_slope}


@dataclass
class OutputLinearization:
    """A flow of `points: (N, d)` to first order in its output weights `W3: (L, d, m)` (the last
    layer of every block), at the current parameters: `J = d vec(phi(points)) / d vec(W3)`.

    Block l moves x by `dt W3_l h_l(x_l)`, so a change `dW3_l` moves the end point by
    `S_l dt dW3_l h_l` with `S_l = d x_L / d x_{l+1}`: `sensitivities` holds `dt S_l: (L, N, d, d)`,
    `features` holds `h_l(x_l): (L, N, m)`, `moved` is `phi(points): (N, d)`.
    """

    moved: torch.Tensor
    sensitivities: torch.Tensor
    features: torch.Tensor

    def kernel(self) -> torch.Tensor:
        """`J J^T: (N d, N d)`, rows in the order of `moved.reshape(-1)`:
        `sum_l (dt S_l,i dt S_l,j^T) (h_l,i . h_l,j)` for points i, j."""
        n, d = self.moved.shape
        # accumulated with the axes in the order (a, i, b, j), so the points' factor broadcasts over
        # contiguous rows of N (in (i, a, j, b) its stride-0 inner axis of d made every pass 2-3x
        # slower), into one buffer, block by block (all L at once: 2x slower); reordered at the end
        kernel = self.moved.new_empty(d, n, d, n)
        rows = self.moved.new_empty(d * n, d * n)
        for block in range(len(self.features)):
            s = self.sensitivities[block].transpose(0, 1).reshape(d * n, d)             # rows (a, i)
            torch.mm(s, s.T, out=rows)
            points = (self.features[block] @ self.features[block].T)[None, :, None, :]   # (1, N, 1, N)
            if block == 0:
                torch.mul(rows.view(d, n, d, n), points, out=kernel)
            else:
                kernel.addcmul_(rows.view(d, n, d, n), points)
        return kernel.permute(1, 0, 3, 2).reshape(n * d, n * d)

    def pullback(self, vectors: torch.Tensor) -> torch.Tensor:
        """`J^T vec(vectors)` for `vectors: (N, d)`, in the shape of W3 `(L, d, m)`."""
        pulled = torch.einsum("lnba,nb->lan", self.sensitivities, vectors)          # (L, d, N)
        return torch.bmm(pulled, self.features)

    def push(self, change: torch.Tensor) -> torch.Tensor:
        """`J vec(change)` for a change of W3 `(L, d, m)`: how the end points move, `(N, d)`."""
        velocities = torch.bmm(self.features, change.transpose(1, 2))              # (L, N, d)
        return torch.einsum("lnba,lna->nb", self.sensitivities, velocities)


def _outputs(h: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """`h @ w3.T` for features `h: (N, m)` and `w3: (d, m)` -> `(N, d)` (a transposed view), as
    `(w3 @ h.T).T`: torch's CPU product with d = 2-3 columns on the right is 3-4x slower."""
    return (w3 @ h.T).T


def _velocity(act, points: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              w3: torch.Tensor) -> torch.Tensor:
    """One block's MLP `w3 act(w2 act(w1 x + b1) + b2)` at `points: (N, d)` -> `(N, d)`;
    `w1: (m, d)`, `w2: (m, m)`, `w3: (d, m)`."""
    h = act(torch.addmm(b1, points, w1.T))                              # (N, m)
    h = act(torch.addmm(b2, h, w2.T))                                   # (N, m)
    return _outputs(h, w3)                                              # (N, d)


@register_deformation
class ResNetFlow(KineticFlow):
    """A time-dependent flow of `blocks` forward-Euler steps, each a 2-hidden-layer MLP of `width`.

    Parameters: `W1: (L, m, d)`, `b1: (L, m)`, `W2: (L, m, m)`, `b2: (L, m)`, `W3: (L, d, m)`.
    `W3` starts at zero, so a new flow is the identity.
    """

    #: fitted by Gauss-Newton in W3 on corresponding points, by Adam otherwise (`pipelines/shape_flow_gn.py`)
    fitted_by: ClassVar[str] = "output-gauss-newton"

    def __init__(self, dim: int = 3, blocks: int = 10, width: int = 64, activation: str = "relu",
                 frequency: float = 1.0, seed: int | None = None):
        super().__init__()
        if dim not in (2, 3):
            raise ShapeflowError(f"ResNetFlow: dim must be 2 or 3, got {dim}")
        if blocks < 1 or width < 1:
            raise ShapeflowError(f"ResNetFlow: blocks and width must be positive, got {blocks} and {width}")
        if activation not in ACTIVATIONS:
            raise ShapeflowError(f"ResNetFlow: unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
        self.dim, self.blocks, self.width, self.activation = dim, blocks, width, activation
        self.frequency = float(frequency)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # W1 sets the spatial frequency of the hidden units over a unit-sized shape.
        self.W1 = nn.Parameter(frequency * torch.randn(blocks, width, dim, generator=gen))
        self.b1 = nn.Parameter(frequency * torch.randn(blocks, width, generator=gen) * 0.5)
        self.W2 = nn.Parameter(torch.randn(blocks, width, width, generator=gen) / math.sqrt(width))
        self.b2 = nn.Parameter(torch.zeros(blocks, width))
        self.W3 = nn.Parameter(torch.zeros(blocks, dim, width))
        # points the kinetic energy is measured on when energy() gets none (set by register)
        self._init_reference(dim)

    @dataclass
    class Options:
        """`register()` options of `model="resnet"`."""

        blocks: int = 10                # number of Euler steps L
        width: int = 64                 # hidden width m
        activation: str = "relu"        # relu (as the paper), tanh, softplus or silu

    @classmethod
    def build(cls, domain: int, options: "ResNetFlow.Options | None" = None, seed: int = 0) -> "ResNetFlow":
        options = options or cls.Options()
        return cls(domain, blocks=options.blocks, width=options.width, activation=options.activation, seed=seed)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "blocks": self.blocks, "width": self.width,
                "activation": self.activation, "frequency": self.frequency}

    @property
    def dt(self) -> float:
        return 1.0 / self.blocks

    def velocity(self, block: int, points: torch.Tensor) -> torch.Tensor:
        """The velocity of block `block` at `points: (N, d)` -> `(N, d)`."""
        return _velocity(ACTIVATIONS[self.activation], points, self.W1[block], self.b1[block], self.W2[block],
                         self.b2[block], self.W3[block])

    def states(self, points: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Positions `x_0..x_L` and velocities `v_0..v_{L-1}`, each `(N, d)`."""
        act, xs, vs = ACTIVATIONS[self.activation], [points], []
        # the transposed weights of every block, split once (a pass then records 5 splits, not 5 L selects)
        weights = zip(self.W1.transpose(1, 2).unbind(), self.b1.unbind(), self.W2.transpose(1, 2).unbind(),
                      self.b2.unbind(), self.W3.unbind())
        for w1t, b1, w2t, b2, w3 in weights:
            h = act(torch.addmm(b1, xs[-1], w1t))                       # (N, m)
            h = act(torch.addmm(b2, h, w2t))                             # (N, m)
            vs.append(_outputs(h, w3))                                   # (N, d)
            xs.append(torch.add(xs[-1], vs[-1], alpha=self.dt))
        return xs, vs

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """`phi(points)` for `points: (N, d)` -> `(N, d)`: `states`' last position, each block's
        output product and step fused (`x + dt W3 h` as one `addmm` on the transposes: 5 operations
        a block instead of 6, 10-20 % faster below 1k points; the same to rounding)."""
        act, x = ACTIVATIONS[self.activation], points
        for w1t, b1, w2t, b2, w3 in zip(self.W1.transpose(1, 2).unbind(), self.b1.unbind(),
                                        self.W2.transpose(1, 2).unbind(), self.b2.unbind(), self.W3.unbind()):
            h = act(torch.addmm(b1, x, w1t))                            # (N, m)
            h = act(torch.addmm(b2, h, w2t))                            # (N, m)
            x = torch.addmm(x.T, w3, h.T, alpha=self.dt).T               # (N, d), a transposed view
        return x

    def linearize(self, points: torch.Tensor) -> OutputLinearization:
        """The flow of `points: (N, d)` (a tensor) to first order in `W3`, without autograd:
        see `OutputLinearization`. One forward pass, then the sensitivities backwards,
        `S_{l-1} = S_l (I + dt Dv_l(x_l))` with `Dv = W3 diag(act'(z2)) W2 diag(act'(z1)) W1`."""
        act, slope = ACTIVATIONS[self.activation], SLOPES[self.activation]
        n, d = points.shape
        with torch.no_grad():
            x, features, slopes = points, [], []
            for w1, b1, w2, b2, w3 in zip(self.W1, self.b1, self.W2, self.b2, self.W3):
                z1 = torch.addmm(b1, x, w1.T)                                   # (N, m)
                h1 = act(z1)
                z2 = torch.addmm(b2, h1, w2.T)                                  # (N, m)
                h = act(z2)
                features.append(h)
                slopes.append((slope(z1, h1), slope(z2, h)))
                x = torch.addmm(x.T, w3, h.T, alpha=self.dt).T                  # as `forward`
            sensitivity = torch.eye(d, dtype=points.dtype, device=points.device).expand(n, d, d)   # S_L = I
            scaled = [None] * self.blocks
            for block in reversed(range(self.blocks)):
                scaled[block] = self.dt * sensitivity                          # dt S_l, (N, d, d)
                s1, s2 = slopes[block]
                back = ((scaled[block] @ self.W3[block]) * s2[:, None, :]) @ self.W2[block]   # (N, d, m)
                # (back s1) W1 as (W1^T (back s1)^T)^T: torch's product with d columns on the right is slow
                pulled = self.W1[block].T @ (back * s1[:, None, :]).view(n * d, -1).T         # (d, N d)
                sensitivity = sensitivity + pulled.T.view(n, d, d)
        return OutputLinearization(x, torch.stack(scaled), torch.stack(features))

    def forward_with_energy(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`phi(points)` and the kinetic energy along the way, in one pass."""
        xs, vs = self.states(points)
        return xs[-1], self._kinetic(vs)

    def _kinetic(self, velocities: list[torch.Tensor]) -> torch.Tensor:
        return kinetic_energy(velocities, self.dt)

    def energy(self, points: torch.Tensor | None = None) -> torch.Tensor:
        """Kinetic energy `dt * sum_l mean_i |v_l(x_l,i)|^2` of the flow of `points: (N, d)`.

        Without `points`, the points the flow was fitted on (`reference_points`) are used.
        """
        points = self._points_for_energy(points)
        return self._kinetic(self.states(points)[1])

    def trajectory(self, points: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Positions at t = k / steps, `(steps + 1, N, d)`; exact for the Euler scheme, which is
        piecewise linear in time. `steps` defaults to the number of blocks."""
        steps = self.blocks if steps is None else steps
        xs = torch.stack(self.states(points)[0])      # (L+1, N, d)
        frames = []
        for t in torch.linspace(0, 1, steps + 1).tolist():
            s = t * self.blocks
            block = min(int(math.floor(s)), self.blocks - 1)
            frac = s - block
            frames.append(xs[block] + frac * (xs[block + 1] - xs[block]))
        return torch.stack(frames)

    def inverse(self, points: torch.Tensor, tol: float = 1e-6, max_iter: int = 200) -> torch.Tensor:
        """Undo the blocks in reverse order, each by the fixed-point iteration
        `x <- y - dt * v_l(x)`. Raises `InverseError` if a block does not converge to `tol`
        (relative to the points' extent), which happens when `dt * Lip(v_l) >= 1`."""
        y = points
        extent = float((y.max(0).values - y.min(0).values).max().clamp_min(1e-12).detach())
        with torch.no_grad():
            for block in reversed(range(self.blocks)):
                x = y.clone()
                for _ in range(max_iter):
                    x_new = y - self.dt * self.velocity(block, x)
                    done = (x_new - x).abs().max() <= tol * extent
                    x = x_new
                    if done:
                        break
                residual = float((x + self.dt * self.velocity(block, x) - y).abs().max())
                if not math.isfinite(residual) or residual > 10 * tol * extent:
                    raise InverseError(f"ResNetFlow.inverse(): block {block} did not converge "
                                       f"(residual {residual:.2e} after {max_iter} iterations); "
                                       "the block is not contractive, so its inverse is not reliable")
                y = x
        return y
