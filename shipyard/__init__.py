"""shipyard: fine-tune Hugging Face models; ship checkpoints that load in transformers, PEFT and vLLM."""

__version__ = "0.1.0"

# The speech-LM's config, model and processor join transformers' Auto classes, so its exports load anywhere
# shipyard is installed without trust_remote_code.
from shipyard.models.speechlm import register as _register_speech_lm

_register_speech_lm()
