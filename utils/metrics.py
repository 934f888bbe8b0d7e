"""Classification and segmentation metrics."""
from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Percent of samples whose label is among the k highest logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, K)
    hits = top == labels.unsqueeze(1)
    return [hits[:, :min(k, logits.shape[1])].any(dim=1).float().mean().item() * 100.0 for k in ks]


def iou_from_confusion(confusion: torch.Tensor) -> dict:
    """Per-class IoU, mIoU and pixel accuracy (percent) from a (K, K) confusion matrix (rows: truth, columns:
    prediction). A class absent from both truth and predictions has IoU NaN and is left out of the mean (mmseg)."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan"))) * 100.0
    total = confusion.sum()
    return {"mIoU": iou.nanmean().item() if (union > 0).any() else float("nan"),
            "pixel_acc": (intersection.sum() / total * 100.0).item() if total > 0 else float("nan"),
            "per_class_iou": iou.tolist()}


class SegmentationMetric:
    """Accumulates a confusion matrix with torchmetrics (pixels labelled ``ignore_index`` left out); ``compute``
    sums it over every process (torchmetrics' own sync), so mIoU is that of the whole validation split."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device):
        from torchmetrics.classification import MulticlassConfusionMatrix  # only the segmentation script needs it

        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False).to(device)

    def update(self, predictions: torch.Tensor, masks: torch.Tensor) -> None:
        self.confusion.update(predictions.flatten(), masks.flatten())

    def compute(self) -> dict:
        result = iou_from_confusion(self.confusion.compute())
        self.confusion.reset()
        return result


def masked_psnr(reconstruction: torch.Tensor, original: torch.Tensor, pixel_mask: torch.Tensor) -> float:
    """PSNR (dB) over the masked pixels of images in [0, 1]: 10 log10(1 / MSE); ``pixel_mask`` 1 = masked."""
    error = ((reconstruction.float() - original.float()) ** 2 * pixel_mask).sum() / pixel_mask.sum().clamp(min=1)
    return (10.0 * torch.log10(1.0 / error.clamp(min=1e-12))).item()
