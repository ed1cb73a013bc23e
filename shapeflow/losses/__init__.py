"""Data terms, and the registry of loss names `register(loss=...)` accepts."""
from .points import (ChamferLoss, L2Loss, SinkhornLoss, chamfer_loss, l2_loss, nearest_neighbors,
                     sinkhorn_loss)

LOSSES = {"sinkhorn": SinkhornLoss, "chamfer": ChamferLoss, "l2": L2Loss}

__all__ = ["LOSSES", "chamfer_loss", "sinkhorn_loss", "l2_loss", "nearest_neighbors",
           "ChamferLoss", "SinkhornLoss", "L2Loss"]
