"""Human video: PyAV decoding and the released on-disk layouts of Something-Something-v2 and Ego4D.

SSv2:  ``<root>/20bn-something-something-v2/<id>.webm`` + ``<root>/labels/{train,validation}.json``
       (list of {"id", "label", "template", "placeholders"}); instruction = label.
Ego4D: ``<root>/v2/full_scale/<video_uid>.mp4`` + ``<root>/v2/annotations/narration.json``
       ({video_uid: {"narration_pass_1": {"narrations": [{"timestamp_sec", "narration_text"}, ...]}, ...}});
       a sample is a window around one narration, instruction = its text without the "#C C " prefix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import numpy as np

SSV2_VIDEOS = "20bn-something-something-v2"
EGO4D_VIDEOS = os.path.join("v2", "full_scale")
EGO4D_NARRATIONS = os.path.join("v2", "annotations", "narration.json")


def resize_crop(frame_HWC: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` and centre-crop to size x size (uint8 in, uint8 out)."""
    from PIL import Image

    h, w = frame_HWC.shape[:2]
    if (h, w) != (size, size):
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        frame_HWC = np.asarray(Image.fromarray(frame_HWC).resize((nw, nh), Image.BILINEAR))
        top, left = (nh - size) // 2, (nw - size) // 2
        frame_HWC = frame_HWC[top:top + size, left:left + size]
    return frame_HWC


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded JPEG/PNG -> uint8[size, size, 3] (JPEG decoded at reduced scale when much larger)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))  # JPEG: decode directly at >= the target scale (DCT scaling)
    return resize_crop(np.asarray(img.convert("RGB")), size)


def probe_duration(path: str) -> float:
    """Duration in seconds (container header, else stream frames / rate, else decoding)."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        if c.duration:
            return c.duration / 1e6
        if s.duration and s.time_base:
            return float(s.duration * s.time_base)
        n = 0
        for _ in c.decode(s):
            n += 1
        return n / float(s.average_rate or 30)


def decode_at(path: str, times_s: list[float], size: int) -> np.ndarray:
    """Frames shown at the given times (seconds), resized + cropped -> uint8[len(times), size, size, 3].

    Seeks once to the keyframe before the first time and decodes only up to the last one; each requested time
    takes the latest frame whose timestamp is <= it (this resamples any source fps to the requested times).
    Times past the end repeat the last frame.
    """
    import av

    order = np.argsort(times_s)
    want = [float(times_s[i]) for i in order]
    out: list = [None] * len(want)
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        tb = float(s.time_base)
        if want[0] > 0.5:
            c.seek(int(max(0.0, want[0]) / tb), stream=s, backward=True, any_frame=False)
        j = 0
        last = None
        for frame in c.decode(s):
            t = frame.time if frame.time is not None else (frame.pts or 0) * tb
            while j < len(want) and t > want[j] + 1e-6:
                if last is None:  # seek landed after the time (rare): use this frame
                    last = frame
                out[j] = last
                j += 1
            last = frame
            if j >= len(want):
                break
        if last is None:
            raise ValueError(f"{path}: no decodable video frames")
        while j < len(want):
            out[j] = last
            j += 1
        frames = {}
        result = np.empty((len(want), size, size, 3), np.uint8)
        for k, frame in enumerate(out):
            if id(frame) not in frames:
                h, w = frame.height, frame.width
                sc = size / min(h, w)
                # Resize in libswscale (fast C) to the short side, then crop.
                img = frame.to_ndarray(format="rgb24", width=max(size, round(w * sc)), height=max(size, round(h * sc)))
                frames[id(frame)] = resize_crop(img, size)
            result[order[k]] = frames[id(frame)]
    return result


# --------------------------------------------------------------------------------------------- layouts
def ssv2_items(root: str, split: str) -> list[dict]:
    """One item per video: {"path", "instruction", "id"}. ``split``: train | eval (= validation.json)."""
    labels = os.path.join(root, "labels", "train.json" if split == "train" else "validation.json")
    if not os.path.exists(labels):
        raise FileNotFoundError(f"SSv2 labels not found: {labels}")
    with open(labels) as f:
        entries = json.load(f)
    return [{"path": os.path.join(root, SSV2_VIDEOS, f"{e['id']}.webm"), "instruction": str(e.get("label", "")),
             "id": str(e["id"])} for e in entries]


_NARRATION_PREFIX = re.compile(r"^\s*#\s*C\s+C\s+", re.IGNORECASE)


def clean_narration(text: str) -> str:
    """"#C C picks up the cup" -> "picks up the cup"; other '#' tags (#unsure, #O) are dropped."""
    text = _NARRATION_PREFIX.sub("", text)
    text = re.sub(r"#\w+", "", text)
    return " ".join(text.split())


def ego4d_items(root: str, select: Callable[[int], np.ndarray] | None = None) -> list[dict]:
    """One item per narration: {"path", "instruction", "center_s", "id"}, of every video or of those whose
    positions in uid order ``select(number of videos)`` returns (the loader's split: whole videos, like robot
    episodes)."""
    path = os.path.join(root, EGO4D_NARRATIONS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Ego4D narrations not found: {path}")
    with open(path) as f:
        narr = json.load(f)
    keep = sorted(narr)
    if select is not None:
        keep = [keep[i] for i in select(len(keep))]
    items = []
    for uid in keep:
        video = os.path.join(root, EGO4D_VIDEOS, f"{uid}.mp4")
        passes = narr[uid] if isinstance(narr[uid], dict) else {}
        for pass_name in sorted(passes):
            p = passes[pass_name]
            for k, n in enumerate(p.get("narrations", []) if isinstance(p, dict) else []):
                items.append({"path": video, "instruction": clean_narration(str(n.get("narration_text", ""))),
                              "center_s": float(n.get("timestamp_sec", 0.0)), "id": f"{uid}/{pass_name}/{k}"})
    return items


def write_video(path: str, frames_THWC: np.ndarray, fps: float, codec: str | None = None) -> None:
    """Write uint8 frames as a video file (VP9 .webm or H.264/mpeg4 .mp4, chosen by extension)."""
    import fractions

    import av

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if codec is None:
        codec = "libvpx-vp9" if path.endswith(".webm") else "libx264"
    with av.open(path, "w") as c:
        try:
            s = c.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        except Exception:  # encoder not built into this FFmpeg: fall back to one that always is
            s = c.add_stream("libvpx" if path.endswith(".webm") else "mpeg4",
                             rate=fractions.Fraction(fps).limit_denominator(1000))
        s.height, s.width = frames_THWC.shape[1:3]
        s.pix_fmt = "yuv420p"
        if codec.startswith("libvpx"):
            s.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b:v": "0"}
        for f in frames_THWC:
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
