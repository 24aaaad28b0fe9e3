"""The media of one episode page (`megavla data view`): the camera video (H.264 MP4, PyAV), a strip
of frames, a thumbnail, and the state/action curves (matplotlib PNG).

Human episodes get their hand keypoints drawn onto the head camera frames. The keypoints are stored
in the head camera's frame (OpenCV axes: x right, y down, z forward; format.py) and projected with a
pinhole of HEAD_FOV_DEG, the mini-world's human head camera (data_shards/miniworld.py:
``MiniWorld.camera``, projection as data_shards/render.py ``Camera.project``). Imported recordings
store no intrinsics, so for them the overlay is only as right as that field of view.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageDraw, ImageFont

from megavla.data_shards import hands
from megavla.data_shards.format import Episode

HEAD_FOV_DEG = 70.0          # the mini-world human head camera (miniworld.MiniWorld.camera)
MIN_PANEL_HEIGHT = 192       # small synthetic frames are upscaled (by an integer factor) to be seen
STRIP_FRAMES = 8
THUMB_WIDTH = 200
HAND_COLORS = {"right": (255, 70, 200), "left": (40, 220, 255)}
# Bones of the 17-keypoint hand (hands.KEYPOINTS): each finger from the wrist, plus the palm's MCP row.
_FINGERS = (("thumb_cmc", "thumb_mcp", "thumb_ip", "thumb_tip"), ("index_mcp", "index_pip", "index_dip"),
            ("middle_mcp", "middle_pip", "middle_dip"), ("ring_mcp", "ring_pip", "ring_dip"),
            ("pinky_mcp", "pinky_pip", "pinky_dip"))
BONES = tuple((hands.KP[a], hands.KP[b]) for f in _FINGERS for a, b in zip(("wrist",) + f, f)) + tuple(
    (hands.KP[a], hands.KP[b]) for a, b in (("index_mcp", "middle_mcp"), ("middle_mcp", "ring_mcp"),
                                            ("ring_mcp", "pinky_mcp")))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def project_keypoints(points: np.ndarray, image_size: int, fov_deg: float = HEAD_FOV_DEG) -> np.ndarray:
    """Head-camera-frame points [..., 3] -> pixels [..., 2] of a square image; NaN where the point
    is unknown (tracker dropout) or behind the camera."""
    points = np.asarray(points, dtype=np.float64)
    focal = 0.5 * image_size / np.tan(np.radians(fov_deg) / 2)
    z = points[..., 2:3]
    with np.errstate(invalid="ignore", divide="ignore"):
        px = points[..., :2] / z * focal + image_size / 2
    known = np.isfinite(points).all(axis=-1, keepdims=True) & (z > 1e-3)
    return np.where(known, px, np.nan)


def draw_hands(image: Image.Image, keypoints: np.ndarray, scale: float) -> int:
    """Draw both hands' skeletons ([2, 17, 3], head-camera frame) onto `image` (the frame upscaled by
    `scale`). Returns how many hands had no keypoints to draw (dropped by the tracker)."""
    draw = ImageDraw.Draw(image)
    size = image.width / scale
    missing = 0
    radius = max(2, round(image.width / 120))
    for hand, name in enumerate(hands.HANDS):
        px = project_keypoints(keypoints[hand], int(round(size))) * scale
        ok = np.isfinite(px).all(axis=-1)
        if not ok.any():
            missing += 1
            continue
        color = HAND_COLORS[name]
        for a, b in BONES:
            if ok[a] and ok[b]:
                draw.line([tuple(px[a]), tuple(px[b])], fill=color, width=max(1, radius // 2))
        for p in px[ok]:
            draw.ellipse([p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius], fill=color,
                         outline=(0, 0, 0))
    return missing


def episode_frames(ep: Episode, cameras: list[str]) -> tuple[list[np.ndarray], int, int]:
    """Per step, the cameras side by side (labelled; hands drawn on a human head camera) as RGB
    uint8 [H, W, 3] with even H and W (H.264 4:2:0); also the integer upscale factor used and the
    width of one camera's panel."""
    first = simplejpeg.decode_jpeg(bytes(ep.frames[cameras[0]][0]))
    scale = max(1, int(np.ceil(MIN_PANEL_HEIGHT / first.shape[0])))
    font = _font(max(10, 6 * scale))
    out = []
    for t in range(ep.num_steps):
        panels = []
        for cam in cameras:
            image = Image.fromarray(simplejpeg.decode_jpeg(bytes(ep.frames[cam][t])))
            if scale > 1:
                image = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
            draw = ImageDraw.Draw(image)
            label = cam
            if cam == "head" and ep.hand_keypoints is not None:
                lost = draw_hands(image, ep.hand_keypoints[t], scale)
                label += f"  (hand lost x{lost})" if lost else ""
            draw.text((4, 2), label, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
            if cam == cameras[0]:
                draw.text((image.width - 4, 2), f"step {t}", anchor="ra", fill=(255, 255, 0), font=font,
                          stroke_width=2, stroke_fill=(0, 0, 0))
            panels.append(np.asarray(image))
        frame = np.concatenate(panels, axis=1)
        h, w = frame.shape[:2]
        out.append(np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0))))
    return out, scale, panels[0].shape[1]


def write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """The episode's cameras as H.264 MP4 (megavla.media.write_h264_mp4), one video frame per step;
    PyAV is an optional dependency (the `import` extra): view.py checks it before any work."""
    from megavla.media import write_h264_mp4
    write_h264_mp4(path, frames, fps, crf=20)


def write_strip(path: Path, frames: list[np.ndarray], count: int = STRIP_FRAMES, width: int = 1000) -> list[int]:
    """JPEG of `count` evenly spaced frames in a row (at most `width` px wide); returns their steps."""
    steps = sorted({int(round(s)) for s in np.linspace(0, len(frames) - 1, min(count, len(frames)))})
    row = np.concatenate([frames[s] for s in steps], axis=1)
    image = Image.fromarray(row)
    if image.width > width:
        image = image.resize((width, max(1, round(image.height * width / image.width))), Image.BILINEAR)
    image.save(path, quality=85)
    return steps


def write_thumbnail(path: Path, frame: np.ndarray, width: int = THUMB_WIDTH) -> None:
    image = Image.fromarray(frame)
    image.resize((width, max(1, round(image.height * width / image.width))), Image.BILINEAR).save(path, quality=85)


# ------------------------------------------------------------------------------------- curves
CURVE_LEFT, CURVE_RIGHT = 0.06, 0.80   # axes span in figure fractions: the page's step cursor uses them
_STATE_PARTS = (("position", slice(0, 3), ("x", "y", "z")),
                ("rotation (6D)", slice(3, 9), ("r00", "r10", "r20", "r01", "r11", "r21")))
_ACTION_PARTS = (("delta position", slice(0, 3), ("dx", "dy", "dz")),
                 ("delta rotation", slice(3, 6), ("rx", "ry", "rz")))


def curve_rows(ep: Episode) -> list[tuple[str, np.ndarray, list[str], np.ndarray]]:
    """(title, values [T, k], dim labels, supervised [k]) per plot row. End-effector embodiments are
    split per arm into position / rotation / gripper (hands.py layout); others by plain dims."""
    S, A = ep.state.shape[1], ep.actions.shape[1]
    arms = A // hands.ARM_DIM
    rows = []
    no_mask = np.ones(0, bool)
    if ep.embodiment != "robot/joint" and A == arms * hands.ARM_DIM and S == arms * hands.ARM_STATE_DIM and arms:
        for arm in range(arms):
            name = hands.HANDS[arm] if arms > 1 else "arm"
            s0, a0 = arm * hands.ARM_STATE_DIM, arm * hands.ARM_DIM
            for part, sl, labels in _STATE_PARTS:
                rows.append((f"{name} state: {part}", ep.state[:, s0:s0 + 10][:, sl], [f"state[{s0 + sl.start + i}] {x}"
                             for i, x in enumerate(labels)], np.ones(len(labels), bool)))
            for part, sl, labels in _ACTION_PARTS:
                dims = list(range(a0 + sl.start, a0 + sl.stop))
                rows.append((f"{name} action: {part}", ep.actions[:, dims], [f"action[{d}] {x}" for d, x in
                             zip(dims, labels)], ep.action_mask[dims]))
            g_state, g_action = s0 + hands.ARM_STATE_DIM - 1, a0 + hands.ARM_DIM - 1
            rows.append((f"{name} gripper (0 open, 1 closed)",
                         np.stack([ep.state[:, g_state], ep.actions[:, g_action]], axis=1),
                         [f"state[{g_state}]", f"action[{g_action}]"],
                         np.array([True, bool(ep.action_mask[g_action])])))
    else:
        for start in range(0, S, 7):
            rows.append((f"state dims {start}-{min(S, start + 7) - 1}", ep.state[:, start:start + 7],
                         [f"state[{d}]" for d in range(start, min(S, start + 7))], np.ones(min(7, S - start), bool)))
        for start in range(0, A, 7):
            dims = list(range(start, min(A, start + 7)))
            rows.append((f"action dims {dims[0]}-{dims[-1]}", ep.actions[:, dims],
                         [f"action[{d}]" for d in dims], ep.action_mask[dims]))
    if ep.joint_actions is not None:
        J = ep.joint_actions.shape[1]
        for start in range(0, J, 7):
            dims = list(range(start, min(J, start + 7)))
            rows.append((f"joint actions {dims[0]}-{dims[-1]} (stored; training does not read them)",
                         ep.joint_actions[:, dims], [f"joint[{d}]" for d in dims], no_mask))
    return rows


def write_curves(path: Path, ep: Episode, dpi: int = 72) -> dict[str, float]:
    """PNG of every state/action dimension against the step, one row per group (curve_rows): masked
    action dims (no loss) dashed grey, invalid steps (step_valid False: no loss) shaded red, subtask
    boundaries dotted. Returns the axes' horizontal span (figure fractions) and size for the cursor."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    rows = curve_rows(ep)
    T = ep.num_steps
    fig = Figure(figsize=(13, 1.25 * len(rows) + 0.5), dpi=dpi)
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    fig.subplots_adjust(left=CURVE_LEFT, right=CURVE_RIGHT, top=1 - 0.3 / fig.get_figheight(),
                        bottom=0.45 / fig.get_figheight(), hspace=0.35)
    invalid = np.flatnonzero(~ep.step_valid)
    steps = np.arange(T)
    for ax, (title, values, labels, supervised) in zip(axes, rows):
        for i, label in enumerate(labels):
            masked = supervised.size and not supervised[i]
            ax.plot(steps, values[:, i], lw=1.3, ls="--" if masked else "-",
                    color="0.55" if masked else f"C{i}", label=label + (" (masked: no loss)" if masked else ""))
        for t in invalid:
            ax.axvspan(t - 0.5, t + 0.5, color="red", alpha=0.15, lw=0)
        for sub in ep.subtasks[1:]:
            ax.axvline(sub.start - 0.5, color="0.3", ls=":", lw=1)
        low, high = float(np.min(values)), float(np.max(values))
        if high - low < 1e-3:  # a constant (or float-noise) row: show it flat, not its 1e-16 wiggles
            ax.set_ylim((low + high) / 2 - 0.05, (low + high) / 2 + 0.05)
        ax.set_title(title, fontsize=9, loc="left", pad=2)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7.5, frameon=False)
    axes[0].set_xlim(-0.5, T - 0.5)
    note = f"   (red: {len(invalid)} steps with step_valid False, no loss)" if len(invalid) else ""
    axes[-1].set_xlabel("step" + note, fontsize=9)
    fig.savefig(path)
    width, height = fig.get_size_inches() * dpi
    # Pixel x of step t = (x0 + (t + 0.5) / T * (x1 - x0)) * width: the xlim is [-0.5, T - 0.5].
    return {"x0": CURVE_LEFT, "x1": CURVE_RIGHT, "width": float(width), "height": float(height)}
