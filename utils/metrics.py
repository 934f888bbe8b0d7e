"""Classification and segmentation metrics."""
from __future__ import annotations

import torch

from models.losses import high_frequency_loss


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


@torch.no_grad()
def reconstruction_metrics(model, mae, images: torch.Tensor, noise: torch.Tensor, normalize,
                           mask_ratio: float | None = None) -> dict:
    """An MAE on fixed images and masks: the loss, the PSNR of the masked pixels (dB, de-normalised images in
    [0, 1]) and the Laplacian (high-frequency) error there. ``model`` runs the forward (it may be wrapped),
    ``mae`` is the plain MaskedAutoencoder, ``normalize`` a pipeline.transforms.Normalize."""
    was_training = model.training
    model.eval()
    output = model(images, noise=noise, mask_ratio=mask_ratio)
    model.train(was_training)
    original = normalize.inverse(images)
    reconstruction = normalize.inverse(mae.reconstruct(output.pred.float(), images.float()))
    pixel_mask = mae.pixel_mask(output.mask)
    return {"val_loss": output.loss.item(), "val_psnr_masked": masked_psnr(reconstruction, original, pixel_mask),
            "val_hf_error": high_frequency_loss(reconstruction, original, pixel_mask).item()}
