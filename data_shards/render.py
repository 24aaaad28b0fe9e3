"""Tiny software renderer for the mini-world: pinhole cameras + flat-shaded polygons, no GL.

Geometry is projected with numpy (near-plane clipped), then filled by PIL's C polygon/line
rasterizer in painter's order (far to near). Flat things lying on the table (table, pads, shadows)
are drawn first in a fixed order; 3D things (blocks, bowls, gripper, hand) are depth-sorted as
whole groups. Cheap enough for thousands of 64 px frames per second-core.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

NEAR = 0.01
LIGHT = np.array([0.3, -0.4, 0.87]) / np.linalg.norm([0.3, -0.4, 0.87])
# Box faces: (corner indices counter-clockwise seen from outside, outward normal in box frame).
_BOX_FACES = (
    ((0, 1, 3, 2), (-1, 0, 0)), ((4, 6, 7, 5), (1, 0, 0)),
    ((0, 4, 5, 1), (0, -1, 0)), ((2, 3, 7, 6), (0, 1, 0)),
    ((0, 2, 6, 4), (0, 0, -1)), ((1, 5, 7, 3), (0, 0, 1)),
)
_BOX_CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
_BOX_INDEX = np.array([f for f, _ in _BOX_FACES])
_BOX_INDEX_LIST = _BOX_INDEX.tolist()
_BOX_NORMALS = np.array([n for _, n in _BOX_FACES], float)
_UNIT_CIRCLES = {n: (np.cos(np.linspace(0, 2 * np.pi, n, endpoint=False)),
                     np.sin(np.linspace(0, 2 * np.pi, n, endpoint=False))) for n in (12, 16)}


def _cross(a, b) -> np.ndarray:
    """np.cross for two 3-vectors without its axis bookkeeping (hot in per-frame cameras)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world pose (OpenCV axes: x right, y down, z forward) looking from eye at target."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = _cross(z, up)
    if np.linalg.norm(x) < 1e-8:  # looking along `up`: any perpendicular will do
        x = _cross(z, [1.0, 0.0, 0.0] if abs(z[0]) < 0.9 else [0.0, 1.0, 0.0])
    x /= np.linalg.norm(x)
    y = _cross(z, x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, y, z, eye
    return pose


@dataclass
class Camera:
    pose: np.ndarray  # camera-to-world [4, 4]
    fov_deg: float
    size: int

    def __post_init__(self):
        self.world_to_cam = np.eye(4)  # rigid inverse: R^T, -R^T t
        self.world_to_cam[:3, :3] = self.pose[:3, :3].T
        self.world_to_cam[:3, 3] = -self.pose[:3, :3].T @ self.pose[:3, 3]
        self.focal = 0.5 * self.size / np.tan(np.radians(self.fov_deg) / 2)

    def to_cam(self, pts: np.ndarray) -> np.ndarray:
        return pts @ self.world_to_cam[:3, :3].T + self.world_to_cam[:3, 3]

    def project(self, cam_pts: np.ndarray) -> np.ndarray:
        """Camera-frame points [N, 3] (z > 0) -> pixel coordinates [N, 2]."""
        return cam_pts[:, :2] / cam_pts[:, 2:3] * self.focal + self.size / 2


def _clip_near(cam_pts: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of one polygon against the plane z = NEAR."""
    inside = cam_pts[:, 2] >= NEAR
    if inside.all():
        return cam_pts
    if not inside.any():
        return cam_pts[:0]
    out = []
    n = len(cam_pts)
    for i in range(n):
        a, b = cam_pts[i], cam_pts[(i + 1) % n]
        if inside[i]:
            out.append(a)
        if inside[i] != inside[(i + 1) % n]:
            s = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + s * (b - a))
    return np.array(out)


class Frame:
    """One image being drawn from one camera. Call draw-order methods, then ``finish()``."""

    def __init__(self, camera: Camera, background, base: Image.Image | None = None):
        self.cam = camera
        self.image = (base.copy() if base is not None
                      else Image.new("RGB", (camera.size, camera.size), tuple(int(c) for c in background)))
        self.draw = ImageDraw.Draw(self.image)
        self.groups: list[tuple[float, list]] = []  # (depth, [(kind, pixels, color, width)])

    # ---------------------------------------------------------------- primitives -------------
    def _pixels(self, world_pts: np.ndarray):
        cam_pts = _clip_near(self.cam.to_cam(world_pts))
        if len(cam_pts) < 3:
            return None
        return [tuple(p) for p in self.cam.project(cam_pts).tolist()]

    def flat(self, world_pts: np.ndarray, color) -> None:
        """A polygon on the table plane, drawn immediately (table layer)."""
        px = self._pixels(world_pts)
        if px is not None:
            self.draw.polygon(px, fill=tuple(int(c) for c in color))

    def box_items(self, pose: np.ndarray, half: np.ndarray, color) -> list:
        """Visible, shaded faces of an oriented box (pose = box-to-world)."""
        return self.boxes_items(pose[None], np.asarray(half, float)[None], np.asarray(color, float)[None])[0]

    def boxes_items(self, poses: np.ndarray, halves: np.ndarray, colors: np.ndarray) -> list[list]:
        """Faces of N boxes at once (the renderer's hot path): poses [N,4,4], halves [N,3],
        colors [N,3] -> per box, its visible shaded faces."""
        rot, trans = poses[:, :3, :3], poses[:, :3, 3]
        corners = np.einsum("nij,nkj->nki", rot, _BOX_CORNERS[None] * halves[:, None]) + trans[:, None]
        cam_corners = corners @ self.cam.world_to_cam[:3, :3].T + self.cam.world_to_cam[:3, 3]
        normals = np.einsum("nij,fj->nfi", rot, _BOX_NORMALS)  # [N, 6, 3] world
        anchors = corners[:, _BOX_INDEX[:, 0]]  # [N, 6, 3]
        visible = np.einsum("nfi,nfi->nf", normals, self.cam.pose[:3, 3] - anchors) > 0
        lum = 0.55 + 0.45 * np.maximum(normals @ LIGHT, 0.0)  # [N, 6]
        shaded = np.minimum(lum[..., None] * colors[:, None], 255).astype(int).tolist()
        in_front = (cam_corners[..., 2] >= NEAR).all(axis=1)
        z = np.where(cam_corners[..., 2:3] >= NEAR, cam_corners[..., 2:3], 1.0)
        px_all = (cam_corners[..., :2] / z * self.cam.focal + self.cam.size / 2).tolist()
        out = []
        for n in range(len(poses)):
            items = []
            for f in np.flatnonzero(visible[n]).tolist():
                if in_front[n]:
                    px = [tuple(px_all[n][i]) for i in _BOX_INDEX_LIST[f]]
                else:
                    cam_face = _clip_near(cam_corners[n, _BOX_INDEX[f]])
                    if len(cam_face) < 3:
                        continue
                    px = [tuple(p) for p in self.cam.project(cam_face).tolist()]
                items.append(("poly", px, tuple(shaded[n][f]), 0))
            out.append(items)
        return out

    def poly_item(self, world_pts: np.ndarray, color) -> list:
        px = self._pixels(world_pts)
        return [] if px is None else [("poly", px, tuple(int(c) for c in color), 0)]

    def line_items(self, world_pts: np.ndarray, radius: float, color) -> list:
        """Thick polyline (fingers, forearm): width from the metric radius at each segment's depth."""
        cam_pts = self.cam.to_cam(world_pts)
        z = cam_pts[:, 2]
        ok = (np.minimum(z[:-1], z[1:]) >= NEAR) & np.isfinite(cam_pts).all(axis=1)[:-1] \
            & np.isfinite(cam_pts).all(axis=1)[1:]
        if not ok.any():
            return []
        px = self.cam.project(np.where(z[:, None] >= NEAR, cam_pts, 1.0)).tolist()
        widths = np.maximum(1, np.rint(4 * radius * self.cam.focal / (z[:-1] + z[1:]))).astype(int).tolist()
        rgb = tuple(int(c) for c in color)
        return [("line", [tuple(px[i]), tuple(px[i + 1])], rgb, widths[i]) for i in np.flatnonzero(ok)]

    def add_group(self, anchor_world: np.ndarray, items: list, bias: float = 0.0) -> None:
        """Queue a group drawn as a unit, sorted by the camera depth of ``anchor_world`` (+bias)."""
        if items:
            depth = float(self.cam.to_cam(anchor_world[None])[0, 2]) + bias
            self.groups.append((depth, items))

    def finish(self) -> np.ndarray:
        for _, items in sorted(self.groups, key=lambda g: -g[0]):
            for kind, px, color, width in items:
                if kind == "poly":
                    self.draw.polygon(px, fill=color)
                else:
                    self.draw.line(px, fill=color, width=width)
                    r = width / 2
                    for x, y in px:  # round joints
                        self.draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        return np.asarray(self.image)


def circle(center, radius: float, n: int = 16) -> np.ndarray:
    """Points of a horizontal circle [n, 3]."""
    cos, sin = _UNIT_CIRCLES[n]
    return np.stack([center[0] + radius * cos, center[1] + radius * sin,
                     np.full(n, float(center[2]))], axis=-1)


def draw_bowl(frame: Frame, center, radius: float, height: float, color) -> None:
    """Draw a bowl now, in the table layer (bowls are low: nothing on the table hides behind one
    enough to matter, and static views can then cache them)."""
    for _, px, rgb, _ in bowl_items(frame, center, radius, height, color):
        frame.draw.polygon(px, fill=rgb)


def bowl_items(frame: Frame, center, radius: float, height: float, color) -> list:
    """A short open cylinder: wall (bottom disc + top disc + the band between their image-space
    extremes), rim, darker inside."""
    bottom, top = circle(center, radius), circle(np.asarray(center) + [0, 0, height], radius)
    inner = circle(np.asarray(center) + [0, 0, height], radius * 0.8)
    cam_all = frame.cam.to_cam(np.concatenate([bottom, top, inner]))
    if (cam_all[:, 2] < NEAR).any():
        return []
    px = frame.cam.project(cam_all)
    n = len(bottom)
    lo, hi = int(np.argmin(px[:n, 0])), int(np.argmax(px[:n, 0]))
    band = px[[lo, hi, n + hi, n + lo]]
    wall, dark = tuple(int(c * 0.8) for c in color), tuple(int(c * 0.6) for c in color)
    rgb = tuple(int(c) for c in color)
    pl = px.tolist()
    return [("poly", [tuple(p) for p in pl[:n]], wall, 0), ("poly", [tuple(p) for p in band.tolist()], wall, 0),
            ("poly", [tuple(p) for p in pl[n:2 * n]], rgb, 0), ("poly", [tuple(p) for p in pl[2 * n:]], dark, 0)]


def gripper_items(frame: Frame, ee: np.ndarray, gripper: float, closed_half_gap: float) -> list:
    """Link, palm and two fingers as boxes in the EE frame; the fingers close with ``gripper``
    from 4 cm half-gap (open) to ``closed_half_gap`` (on a held block, or nearly shut)."""
    half_gap = (1 - gripper) * 0.04 + gripper * closed_half_gap
    offsets = np.array([[0, 0, -0.12], [0, 0, -0.035], [0, half_gap + 0.005, -0.005],
                        [0, -half_gap - 0.005, -0.005]])
    halves = np.array([[0.01, 0.01, 0.07], [0.012, 0.045, 0.01], [0.012, 0.005, 0.025],
                       [0.012, 0.005, 0.025]])
    poses = np.tile(ee, (4, 1, 1))
    poses[:, :3, 3] = offsets @ ee[:3, :3].T + ee[:3, 3]
    colors = np.array([(170, 170, 180)] + [(70, 70, 80)] * 3, float)
    return [item for items in frame.boxes_items(poses, halves, colors) for item in items]


def hand_items(frame: Frame, kp: np.ndarray, ee: np.ndarray, scale: float, skin, sleeve) -> list:
    """A human hand from its 17 world keypoints: sleeve (forearm), palm polygon, finger lines."""
    items = frame.line_items(np.stack([kp[0] - 0.18 * ee[:3, 0], kp[0]]), 0.022 * scale, sleeve)
    items += frame.poly_item(kp[[0, 1, 5, 8, 11, 14]], skin)
    finger_color = tuple(int(c * 0.9) for c in skin)
    for chain in ((1, 2, 3, 4),) + tuple((m, m + 1, m + 2) for m in (5, 8, 11, 14)):
        pts = kp[list(chain)]
        if len(chain) == 3:  # add the fingertip that the 17-point layout leaves out
            pts = np.concatenate([pts, pts[-1:] + 0.8 * (pts[-1:] - pts[-2:-1])])
        items += frame.line_items(pts, 0.009 * scale, finger_color)
    return items
