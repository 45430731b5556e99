"""The LightningModule for video classification: the image classifier's loop, on clips.

It is an ImageClassifier (same constructor, logged metrics, optimizer and learning-rate handling
on resume), so the training job can take either. What differs is the input:

- a batch is (clips, labels) with clips (N, C, T, H, W); an evaluation item with several clips of
  one segment, (N, K, C, T, H, W), is classified by the mean of its clips' logits, so that each
  item stays one segment and accuracy is segment accuracy;
- a batch whose videos all failed to decode arrives as None (``collate_clips``) and is skipped.
"""

from __future__ import annotations

import torch

from trainer.tasks.image_classification.module import ImageClassifier


class VideoClassifier(ImageClassifier):
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() == 6:
            batch, count = clips.shape[:2]
            logits = self.backbone(clips.flatten(0, 1))
            return logits.view(batch, count, -1).mean(dim=1)
        return self.backbone(clips)

    def training_step(self, batch, batch_idx: int):
        # Returning None tells Lightning to skip the optimizer step for this batch.
        return None if batch is None else super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch is not None:
            super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        if batch is not None:
            super().test_step(batch, batch_idx)
