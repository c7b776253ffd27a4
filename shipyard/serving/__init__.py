"""Everything in shipyard that imports vLLM: the worker process `verify` and `generate` run their engines in
(worker.py, engine.py, jobs.py) and the plugin that serves shipyard's speech-LM in vLLM (vllm_plugin.py,
speechlm.py). Importing the package or worker.py imports neither vLLM nor torch."""
