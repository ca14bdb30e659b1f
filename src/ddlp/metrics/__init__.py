"""Evaluation metrics: PSNR / SSIM / LPIPS with piqa 1.3.x conventions, MED for Balls-Interaction,
and the Frechet distance behind FVD."""
from .fvd import frechet_distance, frechet_distance_from_stats
from .image import gaussian_window, psnr, ssim, ssim_map
from .lpips import LPIPS, find_lpips_weights, load_lpips_weights
from .med import (ground_truth_xy, linear_assignment, match_once, med_errors, med_summary, particles_to_xy,
                  xy_to_particles)

__all__ = ["LPIPS", "find_lpips_weights", "frechet_distance", "frechet_distance_from_stats", "gaussian_window",
           "ground_truth_xy", "linear_assignment", "load_lpips_weights", "match_once", "med_errors", "med_summary",
           "particles_to_xy", "psnr", "ssim", "ssim_map", "xy_to_particles"]
