"""Universal Image Worker runtime: loads compiled artifacts and serves them behind RunPod.

Serve time only: offline (never fetches weights), never imports the compiler, Hydra or OmegaConf.
"""

import os

# HF_HUB_OFFLINE is set by runtime.loader, not here: the compiler imports runtime.artifact (the
# artifact contract) and must keep its Hub access.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
