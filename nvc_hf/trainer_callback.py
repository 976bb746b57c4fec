"""A `transformers.Trainer` callback that runs the NVC anchor upkeep after every optimizer step."""

from __future__ import annotations

from transformers import TrainerCallback

from .nebula import NVCBottleneck


class NVCAnchorCallback(TrainerCallback):
    """Call [`NVCBottleneck.update_anchors`] after every optimizer step of a `Trainer` or `Seq2SeqTrainer`.

    Without it the anchors are never initialised from data, so the NVC terms stay off after the warm-up. The latest
    anchor statistics are added to the Trainer's logs.
    """

    def __init__(self):
        self.statistics: dict[str, float] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        for module in model.modules():
            if isinstance(module, NVCBottleneck):
                self.statistics = module.update_anchors(optimizer) or self.statistics
                break

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs.update(self.statistics)


__all__ = ["NVCAnchorCallback"]
