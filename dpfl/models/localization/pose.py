"""Camera pose from predicted scene coordinates (PnP + RANSAC, OpenCV) and pose-error metrics.

Poses are camera-to-world 4x4 matrices, as in 7-Scenes: a camera point x maps to R x + t.
"""

from __future__ import annotations

import math

import numpy as np


def intrinsics(width: int, height: int, focal_640: float = 585.0) -> np.ndarray:
    """7-Scenes' pinhole camera (focal 585 px at 640x480), scaled to ``width`` x ``height``."""
    f = focal_640 * width / 640.0
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=np.float64)


def grid_pixels(height: int, width: int, stride: int) -> np.ndarray:
    """The pixel (u, v) = (i * stride + stride // 2, j * stride + stride // 2) each output cell
    stands for (where its ground-truth coordinate is taken): shape (H/stride, W/stride, 2)."""
    v, u = np.mgrid[0 : height // stride, 0 : width // stride]
    return np.stack([u * stride + stride // 2, v * stride + stride // 2], axis=-1).astype(float)


def estimate_pose(
    coords: np.ndarray,
    pixels: np.ndarray,
    camera: np.ndarray,
    reprojection_px: float = 4.0,
    iterations: int = 256,
    seed: int = 0,
) -> np.ndarray | None:
    """Camera-to-world pose from 2D-3D matches, or None when RANSAC finds no pose.

    ``coords`` (N, 3) scene coordinates, ``pixels`` (N, 2) their image positions.
    """
    import cv2

    if len(coords) < 4:
        return None
    cv2.setRNGSeed(seed)
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(
        np.ascontiguousarray(coords, dtype=np.float64),
        np.ascontiguousarray(pixels, dtype=np.float64),
        camera,
        None,
        iterationsCount=iterations,
        reprojectionError=reprojection_px,
        flags=cv2.SOLVEPNP_ITERATIVE,
    )
    if not ok or inliers is None or len(inliers) < 4:
        return None
    r_wc, _ = cv2.Rodrigues(rvec)  # world -> camera
    pose = np.eye(4)
    pose[:3, :3] = r_wc.T
    pose[:3, 3] = -r_wc.T @ tvec.ravel()
    return pose


def pose_errors(estimate: np.ndarray | None, truth: np.ndarray) -> tuple[float, float]:
    """(translation error in m, rotation error in degrees); infinite when there is no estimate."""
    if estimate is None:
        return math.inf, math.inf
    t_err = float(np.linalg.norm(estimate[:3, 3] - truth[:3, 3]))
    cos = (np.trace(estimate[:3, :3].T @ truth[:3, :3]) - 1) / 2
    return t_err, math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))


def summarize(errors: list[tuple[float, float]]) -> dict[str, float]:
    """Median translation (m) and rotation (deg) errors, and the share within 5 cm and 5 deg."""
    if not errors:
        raise ValueError("no frames to summarise")
    t = np.array([e[0] for e in errors])
    r = np.array([e[1] for e in errors])
    return {
        "median_translation_m": float(np.median(t)),
        "median_rotation_deg": float(np.median(r)),
        "within_5cm_5deg": float(np.mean((t < 0.05) & (r < 5.0))),
    }
