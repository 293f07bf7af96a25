"""ControlNets stored in the artifact: each file converted by diffusers (LDM ``control_model.*`` or
diffusers naming) into a ``ControlNetModel`` whose config is derived from the base's own UNet, so
a ControlNet made for another model fails here with the shapes that disagree, and saved under
``controlnets/NAME/``. The runtime derives the ControlNet pipeline from the loaded one
(``from_pipe``): one copy of the UNet, whatever the number of ControlNets."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from compiler.plan import PlannedFile
from compiler.singlefile import load_component
from compiler.sources import Fetched
from runtime.artifact import CONTROLNET_DIR, ControlNetInfo


def controlnet_config(unet_config: dict[str, Any]) -> dict[str, Any]:
    """A ControlNet config for this UNet: every UNet setting ControlNetModel takes (as diffusers'
    own ``ControlNetModel.from_unet`` copies them), without building a model."""
    from diffusers import ControlNetModel

    takes = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    return {"_class_name": "ControlNetModel", **{k: v for k, v in unet_config.items() if k in takes}}


def build_controlnets(
    pipe: Any, items: list[tuple[PlannedFile, Fetched]], scratch: Path, out: Path
) -> tuple[ControlNetInfo, ...]:
    if not items:
        return ()
    from diffusers import ControlNetModel

    folder = scratch / "controlnet-config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(controlnet_config(dict(pipe.unet.config))))
    infos = []
    for i, (planned, fetched) in enumerate(items):
        assert planned.name is not None and planned.scale is not None
        hint = "use a ControlNet made for the base's family (its UNet widths and blocks)"
        model = load_component(
            ControlNetModel, fetched, scratch, f"controlnet-{i}", folder, f"controlnets.{i}", "the base's UNet", hint
        )
        rel = f"{CONTROLNET_DIR}/{planned.name}"
        model.to(pipe.unet.dtype).save_pretrained(out / rel, safe_serialization=True)
        infos.append(ControlNetInfo(name=planned.name, scale=planned.scale, path=rel))
    return tuple(infos)
