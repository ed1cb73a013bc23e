"""Accuracy figures of registrations: point sets (`points.py`) and images (`images.py`)."""
from .images import (dice_per_label, hausdorff95_per_label, image_registration_metrics, jacobian_statistics,
                     moving_on_fixed_grid, target_registration_error)
from .points import (chamfer_distance, flipped_triangles_percent, hausdorff_distance, jacobian_determinants,
                     landmark_errors, min_jacobian_determinant, rmse, surface_distances,
                     MAX_JACOBIAN_POINTS)

__all__ = ["chamfer_distance", "hausdorff_distance", "rmse", "jacobian_determinants", "min_jacobian_determinant",
           "flipped_triangles_percent", "landmark_errors", "surface_distances", "MAX_JACOBIAN_POINTS", "dice_per_label", "hausdorff95_per_label", "target_registration_error",
           "jacobian_statistics", "image_registration_metrics", "moving_on_fixed_grid"]
