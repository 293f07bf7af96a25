"""The RunPod Hub looks for a handler.py: the worker is the `runtime` package (`python -m runtime`,
the image's CMD); running this file starts the same worker."""

import runpy

if __name__ == "__main__":
    runpy.run_module("runtime", run_name="__main__", alter_sys=True)
