"""shipyard: fine-tune Hugging Face models; ship checkpoints that load in transformers, PEFT and vLLM.

Importing the package is light on purpose (no torch, transformers or torchvision): `shipyard --help` and
`shipyard config show` answer at once, and each command imports what it needs. The speech-LM joins
transformers' Auto classes when `shipyard.models.speechlm` is imported (every command that loads a model does).
"""

__version__ = "0.1.0"
