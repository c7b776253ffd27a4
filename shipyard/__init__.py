"""shipyard: fine-tune Hugging Face models; ship checkpoints that load in transformers, PEFT and vLLM."""

__version__ = "0.1.0"
