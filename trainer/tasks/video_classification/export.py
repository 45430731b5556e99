"""How a video classifier is exported: clips in, logits out, any batch size.

A clip is (3, T, H, W): ``frames_per_clip`` frames taken every ``frame_stride`` decoded frames,
each resized whole to the input size and normalized as images are. The export must give the
trained network's top label on every TEST clip (its largest logit difference is recorded too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.errors import UserError
from trainer.tasks import ExportPlan, TfLitePlan
from trainer.tasks.image_classification.export import logit_comparison
from trainer.tasks.video_classification.clips import ClipSpec, VideoDecodeError, decode_clip
from trainer.tasks.video_classification.data import Segment

RESIZE_RULE = (
    "from a segment, take frames_per_clip frames every frame_stride decoded frames (centred in "
    "the segment; the last frame repeated when it is shorter), resize each whole frame to "
    "input_size (bilinear, antialiased; no crop), scale to [0, 1], then normalize each channel: "
    "(x - mean) / std"
)


def test_clips(segments: Sequence[Segment], spec: ClipSpec) -> list[torch.Tensor]:
    """One centred clip per segment that decodes (evaluation's placement)."""
    clips = []
    for segment in segments:
        try:
            clips.append(decode_clip(segment.path, segment.start, segment.end, spec))
        except VideoDecodeError:
            continue  # evaluation leaves such a segment out too
    return clips


def export_plan(network: nn.Module, spec: ClipSpec, segments: Sequence[Segment]) -> ExportPlan:
    clips = test_clips(segments, spec)
    height, width = spec.size
    frames = spec.frames_per_clip
    metadata: dict[str, Any] = {
        "input_size": [height, width],
        "frames_per_clip": frames,
        "frame_stride": spec.frame_stride,
        "layout": "N x 3 x T x H x W (T = frames_per_clip), float32, RGB; the batch size is free",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "resize": RESIZE_RULE,
        "output": "logits, one per line of labels.txt in that order; softmax gives scores",
    }
    return ExportPlan(
        network=network.eval(),
        example=torch.zeros(2, 3, frames, height, width),  # batch 2: 1 would freeze the size
        input_name="clip",
        output_names=["logits"],
        inputs=[torch.stack(clips).numpy()] if clips else [],
        compare=logit_comparison(None),
        metadata=metadata,
    )


def tflite_plan(
    network: nn.Module, spec: ClipSpec, segments: Sequence[Segment], quantize: str
) -> TfLitePlan:
    """TF Lite takes the network as ONNX does, one normalized float clip a call (a clip's
    frames are decoded and normalized by the app, as for ONNX); the same top label as the
    trained network on every TEST clip."""
    if quantize != "none":
        raise UserError("--quantize int8 is offered for image classification; a video "
                        "classifier exports to TF Lite in float32")  # fmt: skip
    plan = export_plan(network, spec, segments)
    clips = [batch[index : index + 1] for batch in plan.inputs for index in range(len(batch))]

    def reference(clip: np.ndarray) -> list[np.ndarray]:
        return [plan.network(torch.from_numpy(clip)).numpy()]

    layout = "1 x 3 x T x H x W (T = frames_per_clip), float32, RGB; one clip a call"
    return TfLitePlan(
        network=plan.network,
        example=plan.example[:1],
        inputs=clips,
        reference=reference,
        compare=plan.compare,
        metadata={**plan.metadata, "layout": layout},
    )
