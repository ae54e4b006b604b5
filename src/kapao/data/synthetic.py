"""Synthetic multi-person keypoint scenes, written as a COCO-format person_keypoints dataset.

No pretrained weights or COCO images can be fetched in every setting, so kapao ships a small model
trained on these scenes and tests training end to end on them. The figures therefore carry real pose
structure: a 3D kinematic skeleton (torso, head, arms, legs) posed with plausible joint angles
(standing, walking, running, arms raised, sitting, crouching, ...), turned to any yaw (front, side,
back), projected orthographically and drawn back to front with cv2. Visibility follows COCO:
keypoints outside the image are unlabelled (v=0, x=y=0); keypoints hidden behind another person, a
foreground occluder or the person's own body are labelled but occluded (v=1).

Left and right are told apart by cues that survive a left-right flip of the image (flip training
swaps left/right labels, so a "left limbs are lighter" cue would contradict itself): a face (eyes,
nose, mouth) on the front of the head and hair on the back, a V neckline on the front of the shirt,
and feet that point forward.

Everything random comes from one numpy Generator per image seeded by (seed, split, index), so a
dataset is byte-identical for a seed and any image can be regenerated on its own.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from kapao.errors import KapaoError
from kapao.schema import KeypointSchema, coco_schema

# Joints of the internal figure. A schema's keypoints are picked from these by name.
JOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    "head", "neck", "pelvis", "left_hand", "right_hand", "left_foot", "right_foot", "head_center",
)  # fmt: skip
_J = {name: i for i, name in enumerate(JOINTS)}

# Other spellings of the internal joints (after lower-casing and l_/r_ expansion).
ALIASES: dict[str, str] = {
    "head_top": "head", "top_head": "head", "headtop": "head", "top_of_head": "head",
    "upper_neck": "neck", "thorax": "neck", "neck_base": "neck",
    "mid_hip": "pelvis", "hip_center": "pelvis", "center_hip": "pelvis", "root": "pelvis",
    "left_toe": "left_foot", "right_toe": "right_foot", "left_big_toe": "left_foot",
    "right_big_toe": "right_foot", "left_foot_tip": "left_foot", "right_foot_tip": "right_foot",
    "left_palm": "left_hand", "right_palm": "right_hand",
}  # fmt: skip

POSES: tuple[str, ...] = (
    "standing", "walking", "running", "arms_raised", "arms_out", "waving",
    "sitting", "crouching", "bending", "kneeling", "random",
)  # fmt: skip
_POSE_P = np.array([0.25, 0.15, 0.07, 0.10, 0.05, 0.06, 0.10, 0.07, 0.04, 0.04, 0.07])

_SKIN = np.array([(196, 226, 255), (165, 205, 240), (135, 175, 222), (105, 145, 195), (75, 110, 160), (50, 75, 115)])
_HAIR = np.array([(20, 20, 25), (30, 45, 70), (45, 75, 115), (110, 180, 220), (165, 165, 170), (40, 70, 160)])


def _normalize_name(name: str) -> str:
    n = name.strip().lower().replace("-", "_").replace(" ", "_")
    for short, long in (("l_", "left_"), ("r_", "right_")):
        if n.startswith(short):
            n = long + n[len(short) :]
    return ALIASES.get(n, n)


def keypoint_mapping(schema: KeypointSchema) -> tuple[int, ...] | None:
    """Index into JOINTS of each schema keypoint, or None when some name is not a known body joint."""
    idx = [_J.get(_normalize_name(n)) for n in schema.names]
    return None if any(i is None for i in idx) else tuple(int(i) for i in idx)  # type: ignore[arg-type]


def _check_generic(schema: KeypointSchema) -> None:
    """A schema with unknown names is drawn as a limb tree over its skeleton, which must connect all K."""
    k = schema.num_keypoints
    adj: list[set[int]] = [set() for _ in range(k)]
    for a, b in schema.skeleton:
        adj[a].add(b)
        adj[b].add(a)
    seen, todo = {0}, deque([0])
    while todo:
        for j in adj[todo.popleft()] - seen:
            seen.add(j)
            todo.append(j)
    if len(seen) < k:
        unknown = [n for n in schema.names if _normalize_name(n) not in _J]
        raise KapaoError(
            f"{schema.source}: keypoint names {unknown} are not body joints the synthetic generator knows "
            f"(known: {', '.join(JOINTS)}), and the skeleton does not connect all {k} keypoints to draw them "
            "as a generic limb tree; rename them or give a connected 'skeleton'"
        )


# --------------------------------------------------------------------------------------------------
# Figures: joints, drawable parts and per-joint visibility rules, in body-height units.


@dataclass
class _Shape:
    kind: str  # "line" (size = thickness), "circle" (size = radius), "poly" (filled convex)
    pts: np.ndarray  # (n, 2) in figure units (image axes: x right, y down)
    size: float
    color: tuple[int, int, int]
    outline: bool = True


@dataclass
class _Part:
    name: str
    depth: float  # larger = farther from the camera; parts are drawn far to near
    shapes: list[_Shape]


@dataclass
class Figure:
    """One posed person in figure units: joints (NJ, 2) image-axis coords, base visibility (NJ,) from
    the facing rules (2 visible, 1 self-occluded, 0 unlabelled), parts to draw, and per joint the names
    of the parts the joint lies on (anything drawn over the joint that is not one of them occludes it)."""

    joints: np.ndarray
    base_v: np.ndarray
    parts: list[_Part]
    own: list[tuple[str, ...]]


def _unit(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else fallback


def _perp(v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Component of v perpendicular to unit d."""
    return v - float(v @ d) * d


def _rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def sample_pose(rng: np.random.Generator, kind: str | None = None) -> dict[str, float]:
    """Joint angles in degrees for a pose kind (random kind when None). Keys: spine_lean, spine_side,
    twist, head_yaw, head_pitch, and per side s in (l, r): arm_flex_s (forward raise), arm_abd_s
    (sideways raise), elbow_s, elbow_dir_s (0 = forearm bends forward, 90 = up), hip_flex_s, hip_abd_s,
    knee_s."""
    if kind is None:
        kind = str(POSES[rng.choice(len(POSES), p=_POSE_P)])
    if kind not in POSES:
        raise KapaoError(f"pose {kind!r} is unknown; use one of {', '.join(POSES)}")
    u, n = rng.uniform, rng.normal
    a: dict[str, float] = {
        "spine_lean": n(0, 4), "spine_side": n(0, 3), "twist": n(0, 8),
        "head_yaw": float(np.clip(n(0, 22), -70, 70)), "head_pitch": n(0, 8),
    }  # fmt: skip
    for s in "lr":
        a.update({
            f"arm_flex_{s}": n(0, 10), f"arm_abd_{s}": u(3, 20), f"elbow_{s}": u(0, 25),
            f"elbow_dir_{s}": u(-20, 40), f"hip_flex_{s}": n(0, 4), f"hip_abd_{s}": u(0, 8), f"knee_{s}": u(0, 8),
        })  # fmt: skip
    sides = ["l", "r"]
    rng.shuffle(sides)
    front, back = sides
    if kind in ("walking", "running"):
        run = kind == "running"
        ph = u(30, 55) if run else u(12, 35)
        a[f"hip_flex_{front}"], a[f"hip_flex_{back}"] = ph, -ph * u(0.4, 0.9)
        a[f"knee_{front}"] = u(20, 70) if run else u(0, 15)
        a[f"knee_{back}"] = u(50, 110) if run else u(10, 40)
        a[f"arm_flex_{back}"], a[f"arm_flex_{front}"] = ph * u(0.6, 1.3), -ph * u(0.5, 1.0)
        for s in "lr":
            a[f"elbow_{s}"] = u(70, 110) if run else u(5, 40)
            a[f"arm_abd_{s}"] = u(3, 15)
        a["spine_lean"] = u(8, 22) if run else n(3, 3)
    elif kind == "arms_raised":
        for s in sides if rng.random() < 0.6 else sides[:1]:
            if rng.random() < 0.5:
                a[f"arm_flex_{s}"], a[f"arm_abd_{s}"] = u(130, 180), u(5, 30)
            else:
                a[f"arm_flex_{s}"], a[f"arm_abd_{s}"] = n(0, 20), u(120, 170)
            a[f"elbow_{s}"] = u(0, 50)
    elif kind == "arms_out":
        for s in "lr":
            a[f"arm_flex_{s}"], a[f"arm_abd_{s}"], a[f"elbow_{s}"] = n(0, 15), u(70, 105), u(0, 30)
    elif kind == "waving":
        a[f"arm_flex_{front}"], a[f"arm_abd_{front}"] = n(10, 15), u(50, 100)
        a[f"elbow_{front}"], a[f"elbow_dir_{front}"] = u(60, 120), u(70, 100)
    elif kind == "sitting":
        for s in "lr":
            a[f"hip_flex_{s}"], a[f"knee_{s}"], a[f"hip_abd_{s}"] = u(75, 105), u(70, 110), u(0, 18)
            a[f"arm_flex_{s}"], a[f"elbow_{s}"] = u(15, 60), u(30, 90)
        a["spine_lean"] = n(0, 8)
    elif kind == "crouching":
        for s in "lr":
            a[f"hip_flex_{s}"], a[f"knee_{s}"], a[f"hip_abd_{s}"] = u(95, 135), u(100, 145), u(5, 25)
            a[f"arm_flex_{s}"], a[f"elbow_{s}"] = u(20, 80), u(10, 70)
        a["spine_lean"] = u(20, 50)
    elif kind == "bending":
        a["spine_lean"] = u(45, 85)
        for s in "lr":
            a[f"arm_flex_{s}"], a[f"knee_{s}"] = n(0, 20), u(0, 20)
    elif kind == "kneeling":
        a[f"hip_flex_{front}"], a[f"knee_{front}"] = u(75, 100), u(75, 100)
        a[f"hip_flex_{back}"], a[f"knee_{back}"] = u(-10, 10), u(80, 100)
    elif kind == "random":
        a["spine_lean"] = u(-10, 45)
        for s in "lr":
            a.update({
                f"arm_flex_{s}": u(-40, 180), f"arm_abd_{s}": u(0, 150), f"elbow_{s}": u(0, 140),
                f"elbow_dir_{s}": u(-30, 100), f"hip_flex_{s}": u(-30, 110), f"hip_abd_{s}": u(0, 40),
                f"knee_{s}": u(0, 140),
            })  # fmt: skip
    return {k: float(v) for k, v in a.items()}


@dataclass
class PersonSpec:
    """Every random choice for one person; `sample_person` fills it, tests may set fields directly.

    yaw 0 faces the camera (the person's left side on the image's right), 180 shows the back.
    size_px is the longer side of the figure's box; center_px its centre (None: chosen by the scene)."""

    pose: dict[str, float]
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    size_px: float = 200.0
    center_px: tuple[float, float] | None = None
    build: dict[str, float] = field(default_factory=dict)
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    hair: str = "short"  # short | none
    short_sleeves: bool = False
    shorts: bool = False
    side_cue: float = 0.0  # > 0: the person's left limbs are lighter by this fraction (see SceneOptions)


def _jitter(rng: np.random.Generator, bgr: np.ndarray, amount: float) -> tuple[int, int, int]:
    c = np.clip(bgr * rng.uniform(1 - amount, 1 + amount) + rng.normal(0, 6, 3), 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    h, s, v = rng.uniform(0, 180), rng.uniform(0, 255), rng.uniform(30, 250)
    bgr = cv2.cvtColor(np.array([[[h, s, v]]], np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return (int(bgr[0]), int(bgr[1]), int(bgr[2]))


def sample_person(rng: np.random.Generator, pose: str | None = None) -> PersonSpec:
    """A random person: pose, view, body proportions and clothing colours."""
    u = rng.uniform
    angles = sample_pose(rng, pose)
    yaw = u(-180, 180)
    roll = rng.normal(0, 5) if rng.random() > 0.04 else float(rng.choice([-1, 1]) * u(60, 110))  # some lying
    child = rng.random() < 0.12
    build = {
        "height": u(0.95, 1.05),
        "shoulder": u(0.85, 1.2),
        "hip": u(0.85, 1.25),
        "head": u(0.9, 1.12) * (1.3 if child else 1.0),
        "limb": u(0.92, 1.08) * (0.85 if child else 1.0),
        "thick": u(0.7, 1.3),
        "depth": u(0.8, 1.3),
    }
    skin = _jitter(rng, _SKIN[rng.integers(len(_SKIN))].astype(float), 0.08)
    shirt = _random_color(rng)
    colors = {
        "skin": skin,
        "shirt": shirt,
        "sleeve": shirt if rng.random() < 0.8 else _random_color(rng),
        "pants": _random_color(rng),
        "shoes": _jitter(rng, np.array(_random_color(rng), float) * 0.5, 0.2),
        "hair": _jitter(rng, _HAIR[rng.integers(len(_HAIR))].astype(float), 0.15),
        "neckline": skin if rng.random() < 0.7 else _random_color(rng),
        "eyes": _jitter(rng, np.array([30.0, 30.0, 30.0]), 0.3),
    }
    return PersonSpec(
        pose=angles,
        yaw=float(yaw),
        pitch=float(u(-10, 20)),
        roll=float(roll),
        build=build,
        colors=colors,
        hair="none" if rng.random() < 0.12 else "short",
        short_sleeves=bool(rng.random() < 0.35),
        shorts=bool(rng.random() < 0.25),
    )


def _default_build() -> dict[str, float]:
    return {"height": 1.0, "shoulder": 1.0, "hip": 1.0, "head": 1.0, "limb": 1.0, "thick": 1.0, "depth": 1.0}


def _default_colors() -> dict[str, tuple[int, int, int]]:
    return {
        "skin": (150, 190, 230), "shirt": (180, 90, 40), "sleeve": (180, 90, 40), "pants": (60, 60, 60),
        "shoes": (20, 20, 20), "hair": (30, 45, 70), "neckline": (150, 190, 230), "eyes": (30, 30, 30),
    }  # fmt: skip


def build_human(spec: PersonSpec) -> Figure:
    """Pose the 3D skeleton of `spec`, turn it to the view and project it (units: body height ~1)."""
    a, b = spec.pose, {**_default_build(), **spec.build}
    col = {**_default_colors(), **spec.colors}
    L, U, F = np.eye(3)  # body frame: person's left, up, forward (facing direction)
    limb, thick = b["limb"] * b["height"], b["thick"]
    P: dict[str, np.ndarray] = {}

    # torso: pelvis at the origin, spine leaning forward / sideways, shoulders twisted about the spine
    sp = np.radians([a["spine_lean"], a["spine_side"], a["twist"]])
    spine = _unit(np.array([math.sin(sp[1]), math.cos(sp[0]) * math.cos(sp[1]), math.sin(sp[0])]), U)
    Lt = _unit(_perp(math.cos(sp[2]) * L - math.sin(sp[2]) * F, spine), L)
    Ft = np.cross(Lt, spine)  # right-handed (L, U, F): L x U = F
    P["pelvis"] = np.zeros(3)
    P["neck"] = spine * 0.30 * b["height"]
    for s, sign in (("left", 1.0), ("right", -1.0)):
        P[f"{s}_shoulder"] = P["neck"] - spine * 0.025 + sign * Lt * 0.115 * b["shoulder"]
        P[f"{s}_hip"] = sign * L * 0.085 * b["hip"]

    # head: yaw / pitch relative to the torso
    hy, hp = math.radians(a["head_yaw"]), math.radians(a["head_pitch"])
    Fh = math.cos(hy) * Ft - math.sin(hy) * Lt
    Lh = math.cos(hy) * Lt + math.sin(hy) * Ft
    Fh, Uh = math.cos(hp) * Fh - math.sin(hp) * spine, math.cos(hp) * spine + math.sin(hp) * Fh
    r = 0.064 * b["head"] * b["height"]
    P["head_center"] = P["neck"] + spine * 0.045 * b["height"] + Uh * r * 0.95
    c = P["head_center"]
    P["head"] = c + Uh * r
    P["nose"] = c + Fh * r * 0.95 - Uh * r * 0.15
    for s, sign in (("left", 1.0), ("right", -1.0)):
        P[f"{s}_eye"] = c + Fh * r * 0.75 + sign * Lh * r * 0.38 + Uh * r * 0.12
        P[f"{s}_ear"] = c + sign * Lh * r * 0.95 - Fh * r * 0.08

    # arms (angles in the gravity frame, attached at the twisted shoulders) and legs
    for s, sign, k in (("left", 1.0, "l"), ("right", -1.0, "r")):
        fl, ab = math.radians(a[f"arm_flex_{k}"]), math.radians(a[f"arm_abd_{k}"])
        d = _unit(sign * math.sin(ab) * L - math.cos(ab) * math.cos(fl) * U + math.cos(ab) * math.sin(fl) * F, -U)
        ed = math.radians(a[f"elbow_dir_{k}"])
        bend = _unit(_perp(math.cos(ed) * F + math.sin(ed) * U - 0.3 * sign * L, d), _unit(_perp(U, d), F))
        eb = math.radians(a[f"elbow_{k}"])
        fore = math.cos(eb) * d + math.sin(eb) * bend
        P[f"{s}_elbow"] = P[f"{s}_shoulder"] + d * 0.165 * limb
        P[f"{s}_wrist"] = P[f"{s}_elbow"] + fore * 0.145 * limb
        P[f"{s}_hand"] = P[f"{s}_wrist"] + fore * 0.04 * limb

        hf, ha = math.radians(a[f"hip_flex_{k}"]), math.radians(a[f"hip_abd_{k}"])
        t = _unit(sign * math.sin(ha) * L - math.cos(ha) * math.cos(hf) * U + math.cos(ha) * math.sin(hf) * F, -U)
        back = _unit(_perp(-math.sin(hf) * U - math.cos(hf) * F, t), -F)
        kb = math.radians(a[f"knee_{k}"])
        shank = math.cos(kb) * t + math.sin(kb) * back
        P[f"{s}_knee"] = P[f"{s}_hip"] + t * 0.245 * limb
        P[f"{s}_ankle"] = P[f"{s}_knee"] + shank * 0.25 * limb
        foot = _unit(_perp(F + 0.15 * sign * L, shank), F)
        P[f"{s}_foot"] = P[f"{s}_ankle"] + foot * 0.075 * limb - shank * 0.02 * limb
        P[f"{s}_heel"] = P[f"{s}_ankle"] - foot * 0.02 * limb + shank * 0.02 * limb

    # torso surface points (front/back offsets give the side view its thickness)
    dep = 0.065 * b["depth"]
    torso3 = []
    for s, sign in (("left", 1.0), ("right", -1.0)):
        for off in (dep, -dep):
            torso3.append(P[f"{s}_shoulder"] + Ft * off * 0.9 - sign * Lt * 0.012)
            torso3.append(P[f"{s}_hip"] + F * off + sign * L * 0.02)
    neck_f = P["neck"] + Ft * dep * 0.9
    neckline3 = [neck_f + Lt * 0.045 - spine * 0.005, neck_f - Lt * 0.045 - spine * 0.005, neck_f - spine * 0.075]
    hair_c = c - Fh * r * 0.35 + Uh * r * 0.3

    # view: yaw about the vertical, camera pitch, in-plane roll; body (L, U, F) -> camera (x, y-up, z-away)
    M = np.diag([1.0, 1.0, -1.0])  # facing the camera = -z, the person's left on the image's right
    R = _rot("z", spec.roll) @ _rot("x", spec.pitch) @ _rot("y", spec.yaw) @ M

    Ryaw = _rot("y", spec.yaw) @ M  # painter's depth ignores pitch: legs below the chest are not behind it

    def proj(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.asarray(p, float)
        w = p @ R.T
        return np.stack([w[..., 0], -w[..., 1]], -1), p @ Ryaw.T[:, 2]

    def tz(v: np.ndarray) -> float:  # depth component of a direction (< 0: points at the camera)
        return float((R @ v)[2])

    names = list(P)
    xy, z = proj(np.stack([P[n] for n in names]))
    pt = {n: xy[i] for i, n in enumerate(names)}
    zz = {n: float(z[i]) for i, n in enumerate(names)}

    skin, parts = col["skin"], []
    for s in ("left", "right"):
        sleeve_lo = skin if spec.short_sleeves else col["sleeve"]
        shank_c = skin if spec.shorts else col["pants"]
        segs = (
            ("upper_arm", "shoulder", "elbow", 0.05, col["sleeve"], 0.0),
            ("forearm", "elbow", "wrist", 0.042, sleeve_lo, -0.001),
            ("thigh", "hip", "knee", 0.075, col["pants"], 0.0),
            ("shank", "knee", "ankle", 0.058, shank_c, -0.001),
            ("foot", "heel", "foot", 0.045, col["shoes"], -0.002),
        )
        for part, j0, j1, w, color, bias in segs:
            if s == "left" and spec.side_cue > 0:
                color = tuple(int(round(c + (255 - c) * spec.side_cue)) for c in color)
            p0, p1 = pt[f"{s}_{j0}"], pt[f"{s}_{j1}"]
            depth = (zz[f"{s}_{j0}"] + zz[f"{s}_{j1}"]) / 2 + bias
            parts.append(_Part(f"{part}_{s}", depth, [_Shape("line", np.stack([p0, p1]), w * thick, color)]))
        hand = pt[f"{s}_hand"]
        parts.append(_Part(f"hand_{s}", zz[f"{s}_hand"] - 0.003, [_Shape("circle", hand[None], 0.022 * thick, skin)]))

    txy, tzs = proj(np.stack(torso3))
    hull = cv2.convexHull(txy.astype(np.float32)).reshape(-1, 2).astype(float)
    torso_shapes = [_Shape("poly", hull, 0.0, col["shirt"])]
    if tz(Ft) < -0.2:  # the front of the shirt faces the camera: V neckline
        torso_shapes.append(_Shape("poly", proj(np.stack(neckline3))[0], 0.0, col["neckline"], outline=False))
    # an arm or leg goes behind the torso only when it is behind most of the torso's thickness
    parts.append(_Part("torso", float(tzs.mean()) + 1.2 * dep, torso_shapes))
    neck_w = 0.05 * thick * b["head"] ** 0.5
    parts.append(
        _Part(
            "neck",
            zz["neck"] + 1.2 * dep + 0.01,
            [_Shape("line", np.stack([pt["neck"], pt["head_center"]]), neck_w, skin)],
        )
    )

    # head: ears behind or in front of the skull, hair behind (facing) or over it, then the face
    fz = tz(Fh)
    head_shapes: list[_Shape] = []
    ears = [(s, tz(sign * Lh)) for s, sign in (("left", 1.0), ("right", -1.0))]
    er = r * 0.26
    head_shapes += [_Shape("circle", pt[f"{s}_ear"][None], er, skin) for s, ez in ears if ez > 0]
    hair = _Shape("circle", proj(hair_c)[0][None], r * 0.88, col["hair"]) if spec.hair != "none" else None
    if hair is not None and fz < -0.3:
        head_shapes.append(hair)
    head_shapes.append(_Shape("circle", pt["head_center"][None], r, skin))
    if hair is not None and fz >= -0.3:
        head_shapes.append(hair)
    head_shapes += [_Shape("circle", pt[f"{s}_ear"][None], er, skin) for s, ez in ears if ez <= 0]
    eye_n = {
        s: tz(_unit(Fh * math.cos(0.6) + sign * Lh * math.sin(0.6), Fh)) for s, sign in (("left", 1), ("right", -1))
    }
    if fz < 0.0:
        mouth_c = c + Fh * r * 0.85 - Uh * r * 0.5
        mouth = proj(np.stack([mouth_c + Lh * r * 0.25, mouth_c - Lh * r * 0.25]))[0]
        head_shapes.append(_Shape("line", mouth, r * 0.12, col["eyes"], outline=False))
    for s in ("left", "right"):
        if eye_n[s] < 0.1:
            head_shapes.append(_Shape("circle", pt[f"{s}_eye"][None], r * 0.15, col["eyes"], outline=False))
    if fz < 0.25:
        nose_c = tuple(int(v * 0.8) for v in skin)
        head_shapes.append(_Shape("circle", pt["nose"][None], r * 0.17, nose_c, outline=False))  # type: ignore[arg-type]
    parts.append(_Part("head", zz["head_center"] - 0.05, head_shapes))

    # visibility from facing: face features on the far side are self-occluded or unlabelled
    base_v = np.full(len(JOINTS), 2, np.int64)

    def facing(n_z: float, vis: float, occ: float) -> int:
        return 2 if n_z < vis else (1 if n_z < occ else 0)

    base_v[_J["nose"]] = facing(fz, 0.25, 0.6)
    for s in ("left", "right"):
        base_v[_J[f"{s}_eye"]] = facing(eye_n[s], 0.1, 0.5)
        base_v[_J[f"{s}_ear"]] = facing(dict(ears)[s], 0.6, 0.9)

    own: dict[str, tuple[str, ...]] = {n: ("head",) for n in ("nose", "head", "head_center")}
    for s in ("left", "right"):
        own.update({
            f"{s}_eye": ("head",), f"{s}_ear": ("head",),
            f"{s}_shoulder": (f"upper_arm_{s}",), f"{s}_elbow": (f"upper_arm_{s}", f"forearm_{s}"),
            f"{s}_wrist": (f"forearm_{s}", f"hand_{s}"), f"{s}_hand": (f"hand_{s}", f"forearm_{s}"),
            f"{s}_hip": (f"thigh_{s}",), f"{s}_knee": (f"thigh_{s}", f"shank_{s}"),
            f"{s}_ankle": (f"shank_{s}", f"foot_{s}"), f"{s}_foot": (f"foot_{s}",),
        })  # fmt: skip
    own.update({"neck": ("neck", "torso"), "pelvis": ("torso",)})
    joints = np.stack([pt[n] for n in JOINTS])
    return Figure(joints, base_v, parts, [own[n] for n in JOINTS])


def build_generic(rng: np.random.Generator, schema: KeypointSchema) -> Figure:
    """A limb tree over the schema's skeleton, for keypoint sets that are not human body joints."""
    k = schema.num_keypoints
    adj: list[list[int]] = [[] for _ in range(k)]
    for a, b in schema.skeleton:
        adj[a].append(b)
        adj[b].append(a)
    root = int(np.argmax([len(x) for x in adj]))
    pos = np.zeros((k, 2))
    ang = np.zeros(k)
    parent = [-1] * k
    order, todo, seen = [], deque([root]), {root}
    while todo:
        i = todo.popleft()
        order.append(i)
        kids = [j for j in sorted(adj[i]) if j not in seen]
        base = rng.uniform(0, 2 * math.pi)
        for m, j in enumerate(kids):
            seen.add(j)
            parent[j] = i
            if i == root:
                ang[j] = base + 2 * math.pi * m / len(kids) + rng.normal(0, 0.2)
            else:
                ang[j] = ang[i] + rng.uniform(-1.1, 1.1)
            pos[j] = pos[i] + rng.uniform(0.12, 0.3) * np.array([math.cos(ang[j]), math.sin(ang[j])])
            todo.append(j)
    colors = [_random_color(rng) for _ in range(k)]
    parts, own = [], [[] for _ in range(k)]
    for j in order[1:]:
        name = f"edge_{j}"
        w = rng.uniform(0.03, 0.06)
        parts.append(_Part(name, rng.normal(), [_Shape("line", np.stack([pos[parent[j]], pos[j]]), w, colors[j])]))
        own[j].append(name)
        own[parent[j]].append(name)
    parts.append(_Part("root", 10.0, [_Shape("circle", pos[root][None], 0.05, colors[root])]))
    own[root].append("root")
    return Figure(pos, np.full(k, 2, np.int64), parts, [tuple(o) for o in own])


# --------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneOptions:
    """How scenes are drawn (everything else is random per image)."""

    people: tuple[int, int] = (1, 6)  # persons per image, inclusive
    aspect: tuple[float, float] = (1.0, 1.0)  # width / height range
    min_person: float = 30.0  # long side of the smallest person, pixels (the largest fills ~90% of the image)
    clutter: float = 1.0  # background shapes and foreground occluders: 0 none, 1 default, up to 3
    min_kp_area: float = 32.0 * 32.0  # as COCO: persons whose box area is smaller get no keypoint labels
    # > 0 lightens every person's left limbs by this fraction: an easy left/right cue for small
    # models. It contradicts left-right flip augmentation, so train such data with fliplr 0.
    side_cue: float = 0.0


@dataclass
class Scene:
    """An image and its labels: keypoints (P, K, 3) as (x, y, v) in COCO convention (v=0 -> x=y=0),
    boxes (P, 4) xywh clipped to the image, both in the order the persons were drawn (far to near)."""

    image: np.ndarray
    keypoints: np.ndarray
    boxes: np.ndarray


def _background(rng: np.random.Generator, h: int, w: int, clutter: float = 1.0) -> np.ndarray:
    """Gradient + low-frequency noise + clutter shapes (their number scales with `clutter`)."""
    c0, c1 = np.array(_random_color(rng), np.float32), np.array(_random_color(rng), np.float32)
    t = rng.uniform(0, 2 * math.pi)
    ramp = np.arange(w, dtype=np.float32)[None, :] * math.cos(t) + np.arange(h, dtype=np.float32)[:, None] * math.sin(t)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    img = c0 + ramp[..., None] * (c1 - c0)
    cells = int(rng.integers(2, 12))
    blob = rng.normal(0, rng.uniform(8, 45) * min(clutter, 1.0), (cells, cells, 3)).astype(np.float32)
    img += cv2.resize(blob, (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.4:  # ground plane below a horizon
        y0 = int(rng.uniform(0.3, 0.8) * h)
        cv2.rectangle(img, (0, y0), (w, h), _random_color(rng), -1)
    if rng.random() < 0.2 * clutter:  # stripes / tiles
        step = int(rng.integers(8, 60))
        color = _random_color(rng)
        for x in range(int(rng.integers(0, step)), w + h, step * 2):
            cv2.line(img, (x, 0), (x - h if rng.random() < 0.5 else x, h), color, max(1, step // 3))
    s = max(h, w)
    for _ in range(int(rng.integers(4, 30) * clutter)):
        kind = rng.integers(5)
        color = _random_color(rng)
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        size = int(s * rng.uniform(0.02, 0.3))
        fill = -1 if rng.random() < 0.6 else int(rng.integers(1, 6))
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + size, y + int(size * rng.uniform(0.3, 3))), color, fill)
        elif kind == 1:
            cv2.circle(img, (x, y), size // 2, color, fill, cv2.LINE_AA)
        elif kind == 2:
            axes = (size // 2 + 1, int(size * rng.uniform(0.1, 0.6)) + 1)
            cv2.ellipse(img, (x, y), axes, rng.uniform(0, 180), 0, 360, color, fill, cv2.LINE_AA)
        elif kind == 3:  # limb-like bars, so thin strokes alone do not mean "person"
            end = (x + int(rng.normal(0, size)), y + int(rng.normal(0, size)))
            cv2.line(img, (x, y), end, color, int(rng.integers(2, max(3, size // 6))), cv2.LINE_AA)
        else:
            pts = (np.array([x, y]) + rng.normal(0, size, (int(rng.integers(3, 7)), 2))).astype(np.int32)
            cv2.polylines(img, [pts], bool(rng.random() < 0.5), color, int(rng.integers(1, 4)), cv2.LINE_AA)
    if rng.random() < 0.5:  # depth of field: the background a little soft
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 2.0))
    return img


_SHIFT = 4  # cv2 sub-pixel bits
_ONE = 1 << _SHIFT


def _shape_box(sh: _Shape, s: float, off: np.ndarray, pixels: bool = True) -> np.ndarray:
    """x0, y0, x1, y1 of a shape as drawn at scale s (pixels: with the drawing's minimum sizes)."""
    p = sh.pts * s + off
    if pixels:
        pad = {"line": max(sh.size * s, 2.0) / 2 + 1.0, "circle": max(sh.size * s, 1.0) + 1.0}.get(sh.kind, 1.0)
    else:
        pad = {"line": sh.size * s / 2, "circle": sh.size * s}.get(sh.kind, 0.0)
    return np.concatenate([p.min(0) - pad, p.max(0) + pad])


def _draw_shape(img: np.ndarray, ids: np.ndarray, sh: _Shape, s: float, off: np.ndarray, pid: int) -> None:
    """Draw one shape into the image (anti-aliased, dark outline on larger parts) and the id map."""
    p = np.round((sh.pts * s + off) * _ONE).astype(np.int32)
    color = sh.color
    dark = tuple(int(v * 0.55) for v in color)
    aa = cv2.LINE_AA
    if sh.kind == "line":
        t = max(int(round(sh.size * s)), 2)
        a, b = (int(p[0, 0]), int(p[0, 1])), (int(p[1, 0]), int(p[1, 1]))
        ot = t + 2 if sh.outline and t >= 4 else t
        if ot > t:
            cv2.line(img, a, b, dark, ot, aa, _SHIFT)
        cv2.line(img, a, b, color, t, aa, _SHIFT)
        cv2.line(ids, a, b, pid, ot, cv2.LINE_8, _SHIFT)
    elif sh.kind == "circle":
        rad = max(int(round(sh.size * s * _ONE)), _ONE)
        ctr = (int(p[0, 0]), int(p[0, 1]))
        if sh.outline and sh.size * s >= 4:
            cv2.circle(img, ctr, rad + _ONE, dark, -1, aa, _SHIFT)
        cv2.circle(img, ctr, rad, color, -1, aa, _SHIFT)
        cv2.circle(ids, ctr, rad, pid, -1, cv2.LINE_8, _SHIFT)
    else:
        cv2.fillConvexPoly(img, p, color, aa, _SHIFT)
        if sh.outline:
            cv2.polylines(img, [p], True, dark, 1, aa, _SHIFT)
        cv2.fillConvexPoly(ids, p, pid, cv2.LINE_8, _SHIFT)


def _place(rng: np.random.Generator, spec: PersonSpec, box: np.ndarray, h: int, w: int) -> tuple[float, np.ndarray]:
    """Scale so the figure box's long side is spec.size_px, and an offset that puts its centre at
    spec.center_px or at a random place (a quarter of the persons cross the image border)."""
    ext = np.maximum(box[2:] - box[:2], 1e-3)
    s = spec.size_px / float(ext.max())
    bw, bh = ext * s
    if spec.center_px is not None:
        cx, cy = spec.center_px
    else:
        cx = cy = 0.0
        for _ in range(20):
            if rng.random() < 0.25:
                cx, cy = rng.uniform(-0.3 * bw, w + 0.3 * bw), rng.uniform(-0.3 * bh, h + 0.3 * bh)
            else:
                cx = rng.uniform(bw / 2, w - bw / 2) if bw < w else w / 2 + rng.uniform(-0.2, 0.2) * (bw - w)
                cy = rng.uniform(bh / 2, h - bh / 2) if bh < h else h / 2 + rng.uniform(-0.2, 0.2) * (bh - h)
            inside = (min(cx + bw / 2, w) - max(cx - bw / 2, 0)) * (min(cy + bh / 2, h) - max(cy - bh / 2, 0))
            if min(cx + bw / 2, w) > max(cx - bw / 2, 0) and min(cy + bh / 2, h) > max(cy - bh / 2, 0):
                if inside >= 0.3 * bw * bh:
                    break
    center_units = (box[:2] + box[2:]) / 2 * s
    return s, np.array([cx, cy]) - center_units


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    schema: KeypointSchema,
    options: SceneOptions | None = None,
    persons: list[PersonSpec] | None = None,
    occluders: bool = True,
) -> Scene:
    """Draw one scene. `persons` (drawn in the given order, far to near) overrides the random people."""
    opt = options or SceneOptions()
    mapping = keypoint_mapping(schema)
    if mapping is None:
        _check_generic(schema)
    h, w = int(height), int(width)
    img = _background(rng, h, w, opt.clutter)
    ids = np.zeros((h, w), np.int32)

    if persons is None:
        n = int(rng.integers(opt.people[0], opt.people[1] + 1))
        max_px = 0.92 * min(h, w) / max(1.0, math.sqrt(n / 2))
        lo = min(opt.min_person, max_px)
        persons = []
        for _ in range(n):
            spec = sample_person(rng)
            spec.size_px = float(math.exp(rng.uniform(math.log(lo), math.log(max_px))))
            spec.side_cue = opt.side_cue
            persons.append(spec)
        persons.sort(key=lambda p: p.size_px * rng.uniform(0.7, 1.3))  # mostly smaller = farther

    figures, placements = [], []
    for spec in persons:
        fig = build_human(spec) if mapping is not None else build_generic(rng, schema)
        boxes = np.stack([_shape_box(sh, 1.0, np.zeros(2), pixels=False) for part in fig.parts for sh in part.shapes])
        unit_box = np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])
        s, off = _place(rng, spec, unit_box, h, w)
        figures.append(fig)
        placements.append((s, off))

    next_id = 1
    part_ids: list[dict[str, int]] = []
    for fig, (s, off) in zip(figures, placements, strict=True):
        pid: dict[str, int] = {}
        for part in sorted(fig.parts, key=lambda p: -p.depth):
            pid[part.name] = next_id
            for sh in part.shapes:
                _draw_shape(img, ids, sh, s, off, next_id)
            next_id += 1
        part_ids.append(pid)

    if occluders and rng.random() < 0.25 * opt.clutter:  # poles, boxes and tables in front of the people
        for _ in range(int(rng.integers(1, 3))):
            color = _random_color(rng)
            if rng.random() < 0.5:
                x = int(rng.integers(0, w))
                t = int(max(h, w) * rng.uniform(0.01, 0.05)) + 2
                pts = [(x, 0), (x + int(rng.normal(0, 0.05 * w)), h)]
                cv2.line(img, pts[0], pts[1], color, t, cv2.LINE_AA)
                cv2.line(ids, pts[0], pts[1], next_id, t, cv2.LINE_8)
            else:
                x0, y0 = int(rng.integers(0, w)), int(rng.uniform(0.4, 1.0) * h)
                x1, y1 = x0 + int(w * rng.uniform(0.05, 0.4)), y0 + int(h * rng.uniform(0.05, 0.4))
                cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
                cv2.rectangle(ids, (x0, y0), (x1, y1), next_id, -1)
            next_id += 1

    # photometric finish: soft focus, sensor noise
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.0))
    sigma = rng.uniform(0, 6)
    if sigma > 1:
        noise = rng.standard_normal((h, w, 3), dtype=np.float32) * sigma
        img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)

    sel = np.asarray(mapping if mapping is not None else range(schema.num_keypoints))
    kps, boxes_out = [], []
    for fig, (s, off), pid in zip(figures, placements, part_ids, strict=True):
        shape_boxes = np.stack([_shape_box(sh, s, off) for part in fig.parts for sh in part.shapes])
        x0, y0 = np.clip(shape_boxes[:, :2].min(0), 0, [w, h])
        x1, y1 = np.clip(shape_boxes[:, 2:].max(0), 0, [w, h])
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        boxes_out.append([x0, y0, x1 - x0, y1 - y0])
        kp = np.zeros((len(sel), 3))
        kps.append(kp)
        if (x1 - x0) * (y1 - y0) < opt.min_kp_area:  # as COCO: small persons get a box, no keypoints
            continue
        xy = fig.joints[sel] * s + off
        for k, j in enumerate(sel):
            x, y = xy[k]
            v = int(fig.base_v[j])
            if not (0 <= x <= w - 1 and 0 <= y <= h - 1) or v == 0:
                continue
            own = [pid[n] for n in fig.own[j] if n in pid] or [0]
            xi, yi = int(round(x)), int(round(y))
            win = ids[max(yi - 1, 0) : yi + 2, max(xi - 1, 0) : xi + 2]
            mine = np.isin(win, own)
            covered = (~mine) & (win > min(own))  # something drawn after the joint's own part
            if covered.sum() > mine.sum():
                v = 1
            kp[k] = (round(float(x), 2), round(float(y), 2), v)
    k = len(sel)
    return Scene(
        img,
        np.array(kps, float).reshape(-1, k, 3),
        np.round(np.array(boxes_out, float).reshape(-1, 4), 2),
    )


# --------------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class SplitPaths:
    images: Path  # folder of .jpg files
    annotations: Path  # COCO person_keypoints JSON
    num_images: int
    num_persons: int


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KapaoError(f"{path}: cannot write ({e.strerror}); choose a writable output folder") from None


def _image_size(rng: np.random.Generator, imgsz: int, aspect: tuple[float, float]) -> tuple[int, int]:
    """(height, width) with the long side imgsz and width/height drawn log-uniformly from `aspect`."""
    ar = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]))) if aspect[0] != aspect[1] else aspect[0]
    if ar >= 1:
        return max(int(round(imgsz / ar)), 8), imgsz
    return imgsz, max(int(round(imgsz * ar)), 8)


def _crowd_index(kps: np.ndarray, boxes: np.ndarray) -> float:
    """CrowdPose's crowd index: mean over persons of (others' labelled keypoints in the box) /
    (own labelled keypoints)."""
    vals = []
    for i, (x, y, bw, bh) in enumerate(boxes):
        n_own = int((kps[i, :, 2] > 0).sum())
        if n_own == 0:
            continue
        others = np.delete(kps, i, axis=0).reshape(-1, 3)
        lab = others[others[:, 2] > 0]
        inside = (lab[:, 0] >= x) & (lab[:, 0] <= x + bw) & (lab[:, 1] >= y) & (lab[:, 1] <= y + bh)
        vals.append(inside.sum() / n_own)
    return round(float(np.mean(vals)), 4) if vals else 0.0


def _make_one(task: tuple[int, str, int, int, SceneOptions, KeypointSchema, str]) -> dict[str, Any]:
    """Render image `index` of a split and write it; returns its COCO image entry and raw labels."""
    index, split, seed, imgsz, opt, schema, images_dir = task
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    h, w = _image_size(rng, imgsz, opt.aspect)
    scene = render_scene(rng, h, w, schema, opt)
    quality = int(rng.integers(80, 96))
    ok, buf = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise KapaoError(f"{images_dir}: JPEG encoding failed for image {index}")
    name = f"{index + 1:06d}.jpg"
    _atomic_write(Path(images_dir) / name, buf.tobytes())
    return {"file_name": name, "height": h, "width": w, "keypoints": scene.keypoints, "boxes": scene.boxes}


def _check_args(num_images: int, imgsz: int, opt: SceneOptions) -> None:
    people, aspect = opt.people, opt.aspect
    if num_images < 1:
        raise KapaoError(f"number of images is {num_images}; ask for at least 1")
    if imgsz < 32:
        raise KapaoError(f"image size {imgsz} is too small; use at least 32 pixels")
    if people[0] < 0 or people[1] < people[0] or people[1] < 1:
        raise KapaoError(f"people range {people[0]}-{people[1]} is invalid; use MIN-MAX with 0 <= MIN <= MAX, MAX >= 1")
    if not 0.1 <= aspect[0] <= aspect[1] <= 10:
        raise KapaoError(f"aspect range {aspect[0]}-{aspect[1]} is invalid; use LO-HI with 0.1 <= LO <= HI <= 10")
    if not 4 <= opt.min_person <= imgsz:
        raise KapaoError(f"minimum person size {opt.min_person} px is invalid; use 4 to the image size ({imgsz})")
    if not 0 <= opt.clutter <= 3:
        raise KapaoError(f"clutter {opt.clutter} is invalid; use 0 (plain backgrounds) to 3 (busy), default 1")
    if not 0 <= opt.side_cue <= 1:
        raise KapaoError(f"side cue {opt.side_cue} is invalid; use a fraction from 0 (none) to 1")
    if opt.min_kp_area < 0:
        raise KapaoError(f"min_kp_area {opt.min_kp_area} is negative; use 0 to label every person's keypoints")


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KapaoError(f"{path}: cannot create the output folder ({e.strerror}); choose a writable path") from None


def generate_dataset(
    out_dir: str | Path,
    num_images: int,
    imgsz: int = 640,
    people: tuple[int, int] = (1, 6),
    seed: int = 0,
    schema: KeypointSchema | None = None,
    split_name: str = "train",
    *,
    aspect: tuple[float, float] = (1.0, 1.0),
    min_person: float = 30.0,
    clutter: float = 1.0,
    min_kp_area: float = 32.0 * 32.0,
    side_cue: float = 0.0,
    workers: int = 1,
) -> SplitPaths:
    """Write `num_images` scenes to OUT/images/<split>/ and OUT/annotations/person_keypoints_<split>.json.

    Images have their long side = imgsz (width/height drawn from `aspect`), hold people[0]..people[1]
    persons (see SceneOptions for the rest), and depend only on (seed, split_name, index, options),
    whatever `workers` is."""
    schema = schema or coco_schema()
    opt = SceneOptions(
        (int(people[0]), int(people[1])),
        (float(aspect[0]), float(aspect[1])),
        float(min_person),
        float(clutter),
        float(min_kp_area),
        float(side_cue),
    )
    _check_args(num_images, imgsz, opt)
    if keypoint_mapping(schema) is None:
        _check_generic(schema)
    out = Path(out_dir)
    images_dir = out / "images" / split_name
    ann_dir = out / "annotations"
    _mkdir(out)
    _mkdir(images_dir)
    _mkdir(ann_dir)

    tasks = [(i, split_name, int(seed), int(imgsz), opt, schema, str(images_dir)) for i in range(num_images)]
    if workers > 1 and num_images > 1:
        # spawn, not fork: the caller may hold runtime thread pools (torch, ONNX Runtime, OpenVINO)
        # that a forked child inherits half-initialised (a segfault seen under pytest)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_make_one, tasks, chunksize=8))
    else:
        results = [_make_one(t) for t in tasks]

    images, annotations = [], []
    for i, res in enumerate(results):
        image_id = i + 1
        entry: dict[str, Any] = {
            "id": image_id,
            "file_name": res["file_name"],
            "width": res["width"],
            "height": res["height"],
        }
        if schema.evaluator == "crowdpose":
            entry["crowdIndex"] = _crowd_index(res["keypoints"], res["boxes"])
        images.append(entry)
        for kp, box in zip(res["keypoints"], res["boxes"], strict=True):
            bw, bh = float(box[2]), float(box[3])
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [float(v) for v in box],
                "area": round(bw * bh, 2),
                "iscrowd": 0,
                "keypoints": [float(v) if j % 3 < 2 else int(v) for j, v in enumerate(kp.reshape(-1))],
                "num_keypoints": int((kp[:, 2] > 0).sum()),
            })  # fmt: skip
    coco = {
        "info": {"description": "kapao synthetic keypoint scenes", "seed": int(seed), "split": split_name},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{
            "id": 1, "name": "person", "supercategory": "person",
            "keypoints": list(schema.names), "skeleton": [[a + 1, b + 1] for a, b in schema.skeleton],
        }],
    }  # fmt: skip
    ann_path = ann_dir / f"person_keypoints_{split_name}.json"
    _atomic_write(ann_path, json.dumps(coco, separators=(",", ":")).encode())
    return SplitPaths(images_dir, ann_path, len(images), len(annotations))


def write_data_yaml(out_dir: str | Path, schema: KeypointSchema, train: str = "train", val: str = "val") -> Path:
    """OUT/data.yaml in the format of configs/data/coco-kp.yaml, with the full keypoints section."""
    out = Path(out_dir).resolve()
    data = {
        "path": str(out),
        "train_images": f"images/{train}",
        "train_annotations": f"annotations/person_keypoints_{train}.json",
        "val_images": f"images/{val}",
        "val_annotations": f"annotations/person_keypoints_{val}.json",
        "keypoints": schema.to_dict(),
    }
    text = "# kapao synthetic keypoint scenes (kapao synth)\n" + yaml.safe_dump(
        data, sort_keys=False, default_flow_style=None, width=100
    )
    path = out / "data.yaml"
    _atomic_write(path, text.encode())
    return path


def synthesize(
    out_dir: str | Path,
    num_images: int,
    val_images: int | None = None,
    imgsz: int = 640,
    people: tuple[int, int] = (1, 6),
    seed: int = 0,
    schema: KeypointSchema | None = None,
    **options: Any,
) -> Path:
    """A train split, a val split (default: a tenth of num_images, at least 1) and OUT/data.yaml;
    returns the data YAML path. `options`: the keyword options of generate_dataset (aspect,
    min_person, clutter, min_kp_area, workers)."""
    schema = schema or coco_schema()
    nval = max(1, num_images // 10) if val_images is None else int(val_images)
    if num_images >= 1 and nval < 1:
        raise KapaoError(f"number of val images is {nval}; ask for at least 1 (val needs a split)")
    generate_dataset(out_dir, num_images, imgsz, people, seed, schema, "train", **options)
    generate_dataset(out_dir, nval, imgsz, people, seed, schema, "val", **options)
    return write_data_yaml(out_dir, schema)
