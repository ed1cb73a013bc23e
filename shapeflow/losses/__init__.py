"""Data terms: between point sets (`points.py`), between meshes or curves (`varifold.py`), between
images (`images.py`), and the residuals of Gauss-Newton image registration (`residuals.py`; the
learned one and its model files in `learned.py`); `LOSSES` and `RESIDUALS` are the names
`register(loss=...)` accepts for shapes and for images."""
from .._registry import Registry
from .base import PointLoss, Stage
from .images import (IMAGE_LOSSES, DiceLoss, MINDLoss, NCCLoss, SSDLoss, dice_loss, mind_loss, mind_ssc, ncc_loss,
                     one_hot, ssd_loss)
from .learned import FEATURE_NETWORKS, LearnedResidual, build_features, load_features, save_features
from .points import (ChamferLoss, L2Loss, SinkhornLoss, chamfer_loss, l2_loss, nearest_neighbors,
                     sinkhorn_loss)
from .residuals import RESIDUALS, ImageResidual, local_normalise
from .varifold import CurrentsLoss, VarifoldLoss, cell_geometry, varifold_loss

#: the shape `loss=` names
LOSSES: Registry[type[PointLoss]] = Registry("loss", {"sinkhorn": SinkhornLoss, "chamfer": ChamferLoss, "l2": L2Loss,
                                                      "varifold": VarifoldLoss, "currents": CurrentsLoss})

__all__ = ["LOSSES", "IMAGE_LOSSES", "RESIDUALS", "PointLoss", "Stage", "ImageResidual", "local_normalise",
           "LearnedResidual", "FEATURE_NETWORKS", "build_features", "save_features", "load_features",
           "ssd_loss", "ncc_loss", "mind_ssc", "mind_loss", "dice_loss", "one_hot",
           "SSDLoss", "NCCLoss", "MINDLoss", "DiceLoss", "chamfer_loss", "sinkhorn_loss", "l2_loss", "nearest_neighbors",
           "ChamferLoss", "SinkhornLoss", "L2Loss", "cell_geometry", "varifold_loss", "VarifoldLoss", "CurrentsLoss"]
