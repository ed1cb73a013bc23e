"""Data terms, and the registry of loss names `register(loss=...)` accepts."""
from .points import (ChamferLoss, L2Loss, SinkhornLoss, chamfer_loss, l2_loss, nearest_neighbors,
                     sinkhorn_loss)

from .images import (IMAGE_LOSSES, DiceLoss, MINDLoss, NCCLoss, SSDLoss, dice_loss, mind_loss, mind_ssc, ncc_loss,
                     one_hot, ssd_loss)

LOSSES = {"sinkhorn": SinkhornLoss, "chamfer": ChamferLoss, "l2": L2Loss}

__all__ = ["LOSSES", "IMAGE_LOSSES", "ssd_loss", "ncc_loss", "mind_ssc", "mind_loss", "dice_loss", "one_hot",
           "SSDLoss", "NCCLoss", "MINDLoss", "DiceLoss", "chamfer_loss", "sinkhorn_loss", "l2_loss", "nearest_neighbors",
           "ChamferLoss", "SinkhornLoss", "L2Loss"]
