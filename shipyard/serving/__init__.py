"""Serving shipyard's own model classes in other engines (vLLM: `shipyard.serving.vllm_plugin`)."""
