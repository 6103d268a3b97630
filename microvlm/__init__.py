"""MicroVLM: a small vision-language model with a Larimar episodic memory, as a Hugging Face remote-code model.

Importing the package registers MicroVLM with transformers' Auto classes (so `AutoModelForCausalLM.from_pretrained`
works on saved folders without `trust_remote_code` while the package is installed) and marks the classes so that
`save_pretrained` writes the remote-code modules and `auto_map` that let anyone else load them with
`trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration_microvlm import MicroVLMConfig
from .modeling_microvlm import MicroVLMForCausalLM, MicroVLMModel, MicroVLMPreTrainedModel
from .processing_microvlm import MicroVLMProcessor
from .repvit import RepViTConfig, RepViTModel, repvit_state_dict_from_timm


AutoConfig.register(MicroVLMConfig.model_type, MicroVLMConfig, exist_ok=True)
AutoModel.register(MicroVLMConfig, MicroVLMModel, exist_ok=True)  # the body without LM head, as for LLaVA
for _auto_class in (AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(MicroVLMConfig, MicroVLMForCausalLM, exist_ok=True)
MicroVLMConfig.register_for_auto_class()
MicroVLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MicroVLMProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "MicroVLMConfig",
    "MicroVLMForCausalLM",
    "MicroVLMModel",
    "MicroVLMPreTrainedModel",
    "MicroVLMProcessor",
    "RepViTConfig",
    "RepViTModel",
    "repvit_state_dict_from_timm",
]
