"""Nebula Variational Coding (NVC) for the Hugging Face ecosystem."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_nvc import NVCConfig
from .configuration_nvc_point import NVCPointConfig
from .configuration_nvc_text import NVCTextConfig
from .configuration_nvc_vision import NVCVisionConfig
from .image_processing_nvc import NVCImageProcessor
from .modeling_nvc_point import NVCForPointCloudClassification, NVCPointModel, NVCPointPreTrainedModel
from .modeling_nvc_text import NVCForConditionalGeneration, NVCTextModel, NVCTextPreTrainedModel
from .modeling_nvc_vision import NVCForImageClassification, NVCVisionModel, NVCVisionPreTrainedModel
from .nebula import NebulaOutput, NVCBottleneck
from .pipeline_nvc_text import NVCTranslationPipeline
from .trainer_callback import NVCAnchorCallback


__version__ = "0.1.0"

AutoConfig.register(NVCVisionConfig.model_type, NVCVisionConfig, exist_ok=True)
AutoModel.register(NVCVisionConfig, NVCVisionModel, exist_ok=True)
AutoModelForImageClassification.register(NVCVisionConfig, NVCForImageClassification, exist_ok=True)
AutoImageProcessor.register(NVCVisionConfig, slow_image_processor_class=NVCImageProcessor, exist_ok=True)
AutoConfig.register(NVCTextConfig.model_type, NVCTextConfig, exist_ok=True)
AutoModel.register(NVCTextConfig, NVCTextModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(NVCTextConfig, NVCForConditionalGeneration, exist_ok=True)
AutoConfig.register(NVCPointConfig.model_type, NVCPointConfig, exist_ok=True)
AutoModel.register(NVCPointConfig, NVCPointModel, exist_ok=True)

# `save_pretrained` copies the configuration, modeling and processor files (and their flat sibling imports) into
# the output folder and writes `auto_map`, so the folder loads with `trust_remote_code=True` without this package.
NVCVisionConfig.register_for_auto_class()
NVCVisionModel.register_for_auto_class("AutoModel")
NVCForImageClassification.register_for_auto_class("AutoModelForImageClassification")
NVCImageProcessor.register_for_auto_class("AutoImageProcessor")
NVCTextConfig.register_for_auto_class()
NVCTextModel.register_for_auto_class("AutoModel")
NVCForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
# transformers has no Auto class for point-cloud classification, so `AutoModel` gives `NVCPointModel` with or without
# the package, and a saved classifier copies its own code too (see `NVCForPointCloudClassification.save_pretrained`).
NVCPointConfig.register_for_auto_class()
NVCPointModel.register_for_auto_class("AutoModel")
# transformers 5.x has no "translation" task of its own. Registered here, the pipeline's `save_pretrained` copies
# pipeline_nvc_text.py and lists it under `custom_pipelines`, so `pipeline("translation", model=folder,
# trust_remote_code=True)` builds it.
PIPELINE_REGISTRY.register_pipeline(
    "translation", pipeline_class=NVCTranslationPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
)

__all__ = [
    "NVCAnchorCallback",
    "NVCBottleneck",
    "NVCConfig",
    "NVCForConditionalGeneration",
    "NVCForImageClassification",
    "NVCForPointCloudClassification",
    "NVCImageProcessor",
    "NVCPointConfig",
    "NVCPointModel",
    "NVCPointPreTrainedModel",
    "NVCTextConfig",
    "NVCTextModel",
    "NVCTextPreTrainedModel",
    "NVCTranslationPipeline",
    "NVCVisionConfig",
    "NVCVisionModel",
    "NVCVisionPreTrainedModel",
    "NebulaOutput",
]
