"""Indoor scenes for visual localisation: a 7-Scenes reader and a synthetic scene renderer.

7-Scenes layout, per scene: ``seq-NN/frame-NNNNNN.color.png`` (RGB), ``.depth.png`` (uint16
millimetres, 0 or 65535 = no depth) and ``.pose.txt`` (4x4 camera-to-world), with
``TrainSplit.txt`` / ``TestSplit.txt`` naming the sequences (``sequence1`` -> ``seq-01``).
The camera is 7-Scenes' pinhole camera (focal 585 px at 640x480), scaled to the image size.

The renderer ray-casts a textured room with furniture-like boxes along smooth camera
trajectories and writes exactly that layout, so the reader loads it; no download.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfl.models.localization.pose import intrinsics

STRIDE = 8


@dataclass
class SceneFrames:
    images: torch.Tensor  # (N, 3, H, W) float in [0, 1]
    coords: torch.Tensor  # (N, 3, H/8, W/8) scene coordinates (m) at the output grid
    valid: torch.Tensor  # (N, H/8, W/8) bool: depth available there
    poses: torch.Tensor  # (N, 4, 4) camera-to-world
    camera: np.ndarray  # 3x3 intrinsics

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "images": self.images[indices],
            "coords": self.coords[indices],
            "valid": self.valid[indices],
        }


def scene_coordinates(depth: np.ndarray, pose: np.ndarray, camera: np.ndarray):
    """World coordinates and validity at the output grid (pixel u*8+4, v*8+4) of one frame."""
    h, w = depth.shape
    v, u = np.mgrid[STRIDE // 2 : h : STRIDE, STRIDE // 2 : w : STRIDE]
    z = depth[v, u]
    valid = z > 0
    x = (u - camera[0, 2]) / camera[0, 0] * z
    y = (v - camera[1, 2]) / camera[1, 1] * z
    cam = np.stack([x, y, z], axis=0).reshape(3, -1)
    world = pose[:3, :3] @ cam + pose[:3, 3:4]
    return world.reshape(3, *z.shape), valid


def _read_pose(path: Path) -> np.ndarray:
    try:
        pose = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable pose ({err})") from None
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
        raise ValueError(f"{path}: a pose must be a 4x4 matrix of numbers, got shape {pose.shape}")
    return pose


def read_7scenes(root: str | Path, scene: str, split: str = "train") -> SceneFrames:
    """The frames of ``root/scene`` listed by ``TrainSplit.txt`` or ``TestSplit.txt``."""
    import cv2

    base = Path(root) / scene
    split_file = base / {"train": "TrainSplit.txt", "test": "TestSplit.txt"}[split]
    if not split_file.is_file():
        raise FileNotFoundError(f"split file {split_file} does not exist")
    sequences = []
    for line in split_file.read_text().split():
        if not line.startswith("sequence") or not line[8:].isdigit():
            raise ValueError(f"{split_file}: expected lines like 'sequence1', got {line!r}")
        sequences.append(base / f"seq-{int(line[8:]):02d}")
    images, depths, poses = [], [], []
    for seq in sequences:
        frames = sorted(seq.glob("frame-*.color.png"))
        if not frames:
            raise FileNotFoundError(f"no frames (frame-*.color.png) in {seq}")
        for color in frames:
            stem = color.name[: -len(".color.png")]
            depth_path, pose_path = seq / f"{stem}.depth.png", seq / f"{stem}.pose.txt"
            for p in (depth_path, pose_path):
                if not p.is_file():
                    raise FileNotFoundError(f"{p} is missing (frame {color.name})")
            bgr = cv2.imread(str(color), cv2.IMREAD_COLOR)
            depth = cv2.imread(str(depth_path), cv2.IMREAD_UNCHANGED)
            if bgr is None or depth is None:
                raise ValueError(f"cannot decode {color} or {depth_path}")
            images.append(bgr[:, :, ::-1].copy())
            depth = depth.astype(np.float64) / 1000.0
            depth[depth >= 65.535] = 0.0  # 65535 marks missing depth in 7-Scenes
            depths.append(depth)
            poses.append(_read_pose(pose_path))
    h, w = depths[0].shape
    camera = intrinsics(w, h)
    coords, valid = zip(
        *(scene_coordinates(d, p, camera) for d, p in zip(depths, poses, strict=True)), strict=True
    )
    return SceneFrames(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0,
        coords=torch.from_numpy(np.stack(coords)).float(),
        valid=torch.from_numpy(np.stack(valid)),
        poses=torch.from_numpy(np.stack(poses)).float(),
        camera=camera,
    )


# --- the synthetic renderer -------------------------------------------------------------------


def _boxes(
    rng: np.random.Generator, room: np.ndarray, count: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(count):
        size = np.array([rng.uniform(0.4, 1.2), rng.uniform(0.4, 1.2), rng.uniform(0.4, 1.6)])
        lo = np.array(
            [
                rng.uniform(0.2, room[0] - size[0] - 0.2),
                rng.uniform(0.2, room[1] - size[1] - 0.2),
                0.0,
            ]
        )
        out.append((lo, lo + size))
    return out


def _hash(*ints: np.ndarray) -> np.ndarray:
    h = np.uint64(1469598103934665603)
    for a in ints:
        h = (h ^ a.astype(np.uint64)) * np.uint64(1099511628211)
    return h


def _shade(
    points: np.ndarray, surface: np.ndarray, normal_axis: np.ndarray, seed: int
) -> np.ndarray:
    """Colours for hit points: a tint per surface mixed with 20 cm cells of random colour (a
    texture rich enough to localise from), shaded by the face's orientation."""
    with np.errstate(over="ignore"):
        cells = np.floor(points / 0.2).astype(np.int64) + 1000
        h = _hash(cells[:, 0], cells[:, 1], cells[:, 2], surface, np.full_like(surface, seed))
        cell_rgb = np.stack([(h >> np.uint64(s)) & np.uint64(255) for s in (8, 24, 40)], axis=1)
    tints = np.random.default_rng([seed, 9]).uniform(0.1, 1.0, size=(int(surface.max()) + 1, 3))
    rgb = 0.55 * tints[surface] + 0.45 * cell_rgb.astype(np.float64) / 255
    shade = np.array([0.75, 0.9, 1.0])[normal_axis]  # walls vs floor/ceiling
    return np.clip(rgb * shade[:, None], 0, 1)


def render_frame(
    room: np.ndarray,
    boxes,
    pose: np.ndarray,
    camera: np.ndarray,
    width: int,
    height: int,
    seed: int,
):
    """(RGB uint8 (H, W, 3), depth in m along the optical axis (H, W)) seen from ``pose``."""
    v, u = np.mgrid[0:height, 0:width]
    dirs_cam = np.stack(
        [
            (u - camera[0, 2]) / camera[0, 0],
            (v - camera[1, 2]) / camera[1, 1],
            np.ones_like(u, dtype=np.float64),
        ],
        axis=-1,
    ).reshape(-1, 3)
    dirs = dirs_cam @ pose[:3, :3].T
    origin = pose[:3, 3]
    inv = 1.0 / np.where(dirs == 0, 1e-12, dirs)
    # the room: the ray leaves it at the nearest far slab
    t_room = np.min(np.maximum((0 - origin) * inv, (room - origin) * inv), axis=1)
    best_t, surface = t_room, np.zeros(len(dirs), dtype=np.int64)
    for k, (lo, hi) in enumerate(boxes, start=1):
        t1, t2 = (lo - origin) * inv, (hi - origin) * inv
        t_near = np.max(np.minimum(t1, t2), axis=1)
        t_far = np.min(np.maximum(t1, t2), axis=1)
        hit = (t_near <= t_far) & (t_near > 1e-6) & (t_near < best_t)
        best_t = np.where(hit, t_near, best_t)
        surface = np.where(hit, k, surface)
    points = origin + dirs * best_t[:, None]
    # which face: the coordinate closest to a slab plane gives the normal axis
    normal_axis = np.zeros(len(points), dtype=np.int64)
    for k, (lo, hi) in enumerate([(np.zeros(3), room), *boxes]):
        sel = surface == k
        if sel.any():
            d = np.minimum(np.abs(points[sel] - lo), np.abs(points[sel] - hi))
            normal_axis[sel] = np.argmin(d, axis=1)
    rgb = _shade(points, surface * 3 + normal_axis, normal_axis, seed)
    depth = best_t * dirs_cam[:, 2]  # distance along the optical axis
    return (rgb.reshape(height, width, 3) * 255).astype(np.uint8), depth.reshape(height, width)


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world pose (OpenCV axes: x right, y down, z forward) at ``position``."""
    forward = target - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = position
    return pose


def trajectory(
    rng: np.random.Generator,
    room: np.ndarray,
    frames: int,
    offset: float = 0.0,
    jitter: float = 0.0,
) -> list[np.ndarray]:
    """A smooth loop through the room, looking around. The path's shape comes from ``rng`` (draw
    it once per scene); ``offset`` (in frames) and ``jitter`` (m) give a second recording of the
    same walk, as 7-Scenes' test sequences revisit the places of the training ones."""
    centre = room / 2
    amp = np.array([room[0] / 2 - 0.7, room[1] / 2 - 0.7, 0.2])
    freq = rng.integers(1, 3, 3).astype(float)  # integer frequencies: the path is a closed loop
    phase = rng.uniform(0, 2 * np.pi, 4)
    noise = np.random.default_rng(rng.integers(1 << 31))
    poses = []
    for i in range(frames):
        s = (i + offset) / frames * 2 * np.pi
        pos = centre + amp * np.sin(freq * s + phase[:3])
        pos[2] = 1.5 + 0.2 * np.sin(freq[2] * s + phase[2])
        angle = phase[3] + 2 * s
        target = pos + np.array([np.cos(angle), np.sin(angle), -0.25 + 0.15 * np.sin(2 * s)])
        if jitter > 0:
            pos = pos + noise.uniform(-jitter, jitter, 3)
            target = target + noise.uniform(-jitter, jitter, 3)
        poses.append(look_at(pos, target))
    return poses


def render_scene(
    root: str | Path,
    scene: str,
    seed: int,
    train_frames: int = 60,
    test_frames: int = 20,
    width: int = 160,
    height: int = 120,
) -> Path:
    """Render one synthetic scene in 7-Scenes layout: seq-01 (train) and seq-02 (test, the same
    walk recorded again between the training frames).

    Idempotent: an existing complete scene with the same parameters is kept.
    """
    import cv2

    base = Path(root) / scene
    done = base / ".complete"
    spec = f"v2 {seed} {train_frames} {test_frames} {width} {height}\n"
    if done.is_file() and done.read_text() == spec:
        return base
    rng = np.random.default_rng([seed, 5])
    room = np.array([rng.uniform(3.5, 4.5), rng.uniform(3.5, 4.5), rng.uniform(2.4, 2.8)])
    boxes = _boxes(rng, room, 6)
    camera = intrinsics(width, height)
    path_seed = int(rng.integers(1 << 31))
    walks = {
        1: trajectory(np.random.default_rng(path_seed), room, train_frames),
        # the test recording walks the same loop between the training frames, slightly off it
        2: trajectory(np.random.default_rng(path_seed), room, test_frames, offset=0.5, jitter=0.05),
    }
    for seq, poses in walks.items():
        folder = base / f"seq-{seq:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, pose in enumerate(poses):
            rgb, depth = render_frame(room, boxes, pose, camera, width, height, seed)
            stem = folder / f"frame-{i:06d}"
            cv2.imwrite(f"{stem}.color.png", rgb[:, :, ::-1])
            cv2.imwrite(f"{stem}.depth.png", np.round(depth * 1000).astype(np.uint16))
            np.savetxt(f"{stem}.pose.txt", pose, fmt="%.8f")
    (base / "TrainSplit.txt").write_text("sequence1\n")
    (base / "TestSplit.txt").write_text("sequence2\n")
    done.write_text(spec)
    return base


class SceneDataset:
    """Scenes as users: ``user_data`` is a scene's training frames, ``user_test_data`` its test
    frames (7-Scenes layout under ``root``). A scene is read when first asked for, so a node
    reads only its own."""

    def __init__(self, root: str, scenes: Sequence[str]) -> None:
        if not scenes:
            raise ValueError("need at least one scene")
        self.root = root
        self.scenes = list(scenes)
        self._frames: dict[tuple[int, str], Any] = {}

    @property
    def num_users(self) -> int:
        return len(self.scenes)

    def _read(self, user: int, split: str):
        if not 0 <= int(user) < self.num_users:
            raise IndexError(f"user {user} is not one of the {self.num_users} scenes")
        key = (int(user), split)
        if key not in self._frames:
            self._frames[key] = read_7scenes(self.root, self.scenes[int(user)], split)
        return self._frames[key]

    def user_data(self, user: int):
        return self._read(user, "train")

    def user_test_data(self, user: int):
        return self._read(user, "test")

    def test_data(self):
        return self._read(0, "test")


def constant_baseline(dataset: SceneDataset) -> dict[str, float]:
    """Predict every pixel at the scene's mean training coordinate: the floor any model must beat
    (PnP on a constant has no pose, so its errors are infinite; the coordinate error is finite)."""
    errs = []
    for user in range(dataset.num_users):
        train, test = dataset.user_data(user), dataset.user_test_data(user)
        centre = (train.coords * train.valid[:, None]).sum(dim=(0, 2, 3)) / train.valid.sum()
        errs.append(
            torch.linalg.vector_norm(test.coords - centre[None, :, None, None], dim=1)[test.valid]
        )
    return {"median_coordinate_error_m": float(torch.cat(errs).median())}
