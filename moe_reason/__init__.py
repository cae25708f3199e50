"""moe_reason: mixture-of-experts causal LMs and their recursive-reasoning variant.

Importing the package registers the models with transformers' Auto classes, and
marks them for `register_for_auto_class` so a saved folder also loads with
`trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models.configuration_moe_reason import PRESETS, MoEReasonConfig
from .models.configuration_recursive import RecursiveMoEReasonConfig
from .models.modeling_moe_reason import MoEReasonForCausalLM, MoEReasonModel, MoEReasonPreTrainedModel
from .models.modeling_recursive import RecursiveMoEReasonForCausalLM

__version__ = "0.1.0"

AutoConfig.register(MoEReasonConfig.model_type, MoEReasonConfig)
AutoModel.register(MoEReasonConfig, MoEReasonModel)
AutoModelForCausalLM.register(MoEReasonConfig, MoEReasonForCausalLM)
MoEReasonConfig.register_for_auto_class()
MoEReasonModel.register_for_auto_class("AutoModel")
MoEReasonForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(RecursiveMoEReasonConfig.model_type, RecursiveMoEReasonConfig)
AutoModelForCausalLM.register(RecursiveMoEReasonConfig, RecursiveMoEReasonForCausalLM)
RecursiveMoEReasonConfig.register_for_auto_class()
RecursiveMoEReasonForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["PRESETS", "MoEReasonConfig", "MoEReasonForCausalLM", "MoEReasonModel", "MoEReasonPreTrainedModel",
           "RecursiveMoEReasonConfig", "RecursiveMoEReasonForCausalLM"]
