"""Image processor for the NVC image models: grayscale or RGB conversion, resize and rescale to [0, 1]."""

from __future__ import annotations

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling


class NVCImageProcessor(PilBackend):
    r"""
    Prepares images for [`NVCForImageClassification`]: converts them to `num_channels` channels (1 for grayscale,
    3 for RGB), resizes them to `size` and rescales 0-255 values to [0, 1]. The pixels are not normalised further,
    because the model's decoder reconstructs them with a binary cross-entropy that needs targets in [0, 1].

    Args:
        num_channels (`int`, *optional*, defaults to 1):
            Channels the model expects.
        size (`dict[str, int]`, *optional*, defaults to `{"height": 28, "width": 28}`):
            Output size.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    size = {"height": 28, "width": 28}
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = False
    do_convert_rgb = False

    def __init__(self, num_channels: int = 1, **kwargs):
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels!r}.")
        self.num_channels = num_channels
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["num_channels"] = self.num_channels
        auto_map = output.get("auto_map") or {}
        if isinstance(auto_map.get("AutoImageProcessor"), str):
            # The (slow, fast) pair form, with no fast class. From a plain string, transformers 5.25's
            # AutoVideoProcessor derives a video processor reference that does not exist and prompts for
            # trust_remote_code, which `pipeline("image-classification")` triggers. It derives nothing from the pair.
            output["auto_map"] = {**auto_map, "AutoImageProcessor": [auto_map["AutoImageProcessor"], None]}
        return output

    def process_image(self, image, **kwargs) -> np.ndarray:
        """Convert one PIL image, NumPy array or tensor to a channels-first array with `num_channels` channels."""
        if hasattr(image, "convert") and hasattr(image, "mode"):
            image = image.convert("L" if self.num_channels == 1 else "RGB")
        image = super().process_image(image, **kwargs)
        channels = image.shape[0]
        if channels == self.num_channels:
            return image
        if self.num_channels == 1 and channels in (3, 4):
            # ITU-R BT.601 luma weights, the same that PIL uses for mode "L".
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, 1, 1)
            return (image[:3].astype(np.float32) * weights).sum(0, keepdims=True)
        if self.num_channels == 3 and channels == 1:
            return np.repeat(image, 3, axis=0)
        raise ValueError(
            f"Cannot convert an image with {channels} channels to the {self.num_channels} channels the model expects."
        )


__all__ = ["NVCImageProcessor"]
