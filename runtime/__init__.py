"""Universal Image Worker runtime: loads compiled artifacts and serves them behind RunPod.

Serve time only: offline (never fetches weights), never imports the compiler, Hydra or OmegaConf.
"""

import os

# Artifacts are complete: nothing at serve time may reach the Hub. Set before diffusers or
# huggingface_hub are imported anywhere in the process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
