"""Make `import torchvision` work in this environment, or say why it cannot (run by `make install`).

    python shipyard/compat/install_torchvision_shim.py

Run as a file, not as `-m shipyard...`: it must not depend on anything under shipyard that imports
transformers (and so torchvision, the very import this repairs).

Does nothing where torchvision already imports (a CUDA torch with its matching
torchvision) or is absent. Where it fails only because its compiled ops do not
load against a CPU torch, installs `torchvision_cpu_ops.py` as a site-packages
hook and checks again in a fresh interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HOOK_MODULE = "shipyard_torchvision_cpu_ops"
PTH_FILE = "zz_shipyard_torchvision_cpu_ops.pth"


def _import_error() -> str | None:
    proc = subprocess.run([sys.executable, "-c", "import torchvision.transforms.v2.functional"],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def main() -> int:
    error = _import_error()
    if error is None or "No module named 'torchvision'" in error:
        return 0
    import torch

    if torch.version.cuda is not None or "torchvision::nms does not exist" not in error:
        print(f"torchvision does not import: {error}", file=sys.stderr)
        return 1
    site = Path(sysconfig.get_paths()["purelib"])
    shutil.copyfile(Path(__file__).with_name("torchvision_cpu_ops.py"), site / f"{HOOK_MODULE}.py")
    (site / PTH_FILE).write_text(f"import {HOOK_MODULE}\n")
    error = _import_error()
    if error is not None:
        print(f"torchvision still does not import with the CPU ops hook: {error}", file=sys.stderr)
        return 1
    print(f"torchvision: CPU torch with a CUDA-built torchvision; installed {site / PTH_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
