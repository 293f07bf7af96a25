"""compiler.family_configs against diffusers, transformers and the real checkpoints' layouts.

Every config repo is written out (tests/helpers/configrepos.py) and read back the way
``from_single_file(path, config=folder)`` reads it; every model component is built on the meta
device (no weights allocated) and its parameter count compared with the real model's; and the real
single-file layouts in tests/fixtures/model-keys are converted with diffusers' own single-file
converters onto the models these configs build, which must take every tensor at its exact shape.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from compiler.families import FAMILIES
from compiler.family_configs import CONFIG_REPOS, CONFIGS, REPOS, VARIANT_REPOS
from tests.conftest import REPO
from tests.helpers.configrepos import config_repo_files, push_config_repos
from tests.helpers.detect_cases import fixture_path
from tests.helpers.fakehub import FakeHub

# --- the real models' parameter counts -----------------------------------------------------------
# "fixture": the sum of the real checkpoint's tensors in tests/fixtures/model-keys
# (test_counts_are_the_real_checkpoints_sums re-derives each one); "derived": computed by hand from
# a fixture count and the architecture difference; "pinned": what this config builds, consistent
# with the published round figure but with no exact independent source.
CLIP_L = 123_060_480  # fixture (sd1-ldm clip_l)
CLIP_L_PROJ = CLIP_L + 768 * 768  # fixture (sd3 clip_l, less its logit_scale scalar)
OPENCLIP_G_PROJ = 694_659_840  # fixture (sd3 clip_g, less logit_scale)
# derived: 23 layers x 12,596,224 + token/position embeddings 50,672,640 + final norm 2,048
OPENCLIP_H_23 = 340_387_840
T5_XXL = 4_762_310_656  # fixture (sd3 / flux t5xxl)
SD_VAE = 83_653_863  # fixture (sd1, sdxl)
VAE_16 = 83_819_683  # fixture (sd3, flux): 16 latent channels, no quant convs
SD15_UNET = 859_520_964  # fixture
# derived: attn2.to_k/to_v widen 768 -> 1024 in all 16 transformer blocks (sum of widths 12,480)
SD2_UNET = SD15_UNET + 2 * 256 * 12_480
INPAINT_CONV_IN = 5 * 320 * 3 * 3  # derived: 4 -> 9 input channels of conv_in
SDXL_UNET = 2_567_463_684  # fixture
SDXL_REFINER_UNET = 2_259_526_660  # pinned ("2.3B")
SD3_MMDIT = 2_028_328_000  # fixture (diffuser less pos_embed, a buffer in diffusers, and sigmas)
SD35_MEDIUM_MMDIT = 2_243_171_520  # pinned (2.47B with the 384x384 pos_embed: "2.5B")
SD35_LARGE_MMDIT = 8_056_627_520  # pinned (8.15B with the 192x192 pos_embed: "8.1B")
FLUX_DEV = 11_901_408_320  # fixture
FLUX_GUIDANCE_EMBEDDER = (256 * 3072 + 3072) + (3072 * 3072 + 3072)  # derived: absent in schnell
FLUX_FILL_X_EMBEDDER = (384 - 64) * 3072  # derived: 384 packed input channels instead of 64

_SD3_TEXT = {"text_encoder": CLIP_L_PROJ, "text_encoder_2": OPENCLIP_G_PROJ, "text_encoder_3": T5_XXL}
_FLUX_TEXT = {"text_encoder": CLIP_L, "text_encoder_2": T5_XXL}
EXPECTED: dict[str, dict[str, int]] = {
    "sd15": {"text_encoder": CLIP_L, "unet": SD15_UNET, "vae": SD_VAE},
    "sd15/inpaint": {"text_encoder": CLIP_L, "unet": SD15_UNET + INPAINT_CONV_IN, "vae": SD_VAE},
    "sd2": {"text_encoder": OPENCLIP_H_23, "unet": SD2_UNET, "vae": SD_VAE},
    "sd2/inpaint": {"text_encoder": OPENCLIP_H_23, "unet": SD2_UNET + INPAINT_CONV_IN, "vae": SD_VAE},
    "sdxl": {"text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_G_PROJ, "unet": SDXL_UNET, "vae": SD_VAE},
    "sdxl/inpaint": {
        "text_encoder": CLIP_L,
        "text_encoder_2": OPENCLIP_G_PROJ,
        "unet": SDXL_UNET + INPAINT_CONV_IN,
        "vae": SD_VAE,
    },
    "sdxl-refiner": {"text_encoder_2": OPENCLIP_G_PROJ, "unet": SDXL_REFINER_UNET, "vae": SD_VAE},
    "sd3": {**_SD3_TEXT, "transformer": SD3_MMDIT, "vae": VAE_16},
    "sd35-medium": {**_SD3_TEXT, "transformer": SD35_MEDIUM_MMDIT, "vae": VAE_16},
    "sd35-large": {**_SD3_TEXT, "transformer": SD35_LARGE_MMDIT, "vae": VAE_16},
    "flux-dev": {**_FLUX_TEXT, "transformer": FLUX_DEV, "vae": VAE_16},
    "flux-schnell": {**_FLUX_TEXT, "transformer": FLUX_DEV - FLUX_GUIDANCE_EMBEDDER, "vae": VAE_16},
    "flux-fill": {**_FLUX_TEXT, "transformer": FLUX_DEV + FLUX_FILL_X_EMBEDDER, "vae": VAE_16},
}

# Config keys a model class does not take, kept because the real file has them: the SDXL
# inpainting UNet's config carries its training run's EMA settings.
IGNORED_MODEL_KEYS = {"decay", "inv_gamma", "min_decay", "optimization_step", "power", "update_after_step"}
IGNORED_MODEL_KEYS |= {"use_ema_warmup", "_class_name", "_diffusers_version", "_name_or_path"}


def _components(index: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(name, library, class) of each non-null component of a model_index.json."""
    for name, value in sorted(index.items()):
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None:
            yield name, value[0], value[1]


def _class(library: str, name: str) -> Any:
    return getattr(importlib.import_module(library), name)


@cache
def _meta_model(library: str, class_name: str, config_json: str) -> Any:
    """The model a config builds, on the meta device: shapes, no storage. Cached per distinct
    config, so the CLIP-L, T5 and VAE shared across families are built once."""
    import torch

    cls = _class(library, class_name)
    config = json.loads(config_json)
    # torch.device("meta") rather than accelerate.init_empty_weights: buffers go to meta too, so
    # SD 3.5 medium's 384x384 positional table (0.9 GB in fp32) is never computed.
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(config)
        return cls(cls.config_class.from_dict(config))


def meta_model(key: str, name: str) -> Any:
    library, class_name = CONFIGS[key]["model_index.json"][name]
    return _meta_model(library, class_name, json.dumps(CONFIGS[key][f"{name}/config.json"], sort_keys=True))


def _write(files: dict[str, bytes], folder: Path) -> Path:
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


# --- the module and the registry -----------------------------------------------------------------


def test_family_configs_is_pure_data():
    tree = ast.parse((REPO / "compiler" / "family_configs.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "typing", "compiler.families"}  # data only: no I/O, no torch


def test_repos_are_the_ones_the_family_registry_and_diffusers_name():
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    # every family and variant of the registry has its config files, and every repo is one
    # diffusers itself defaults to
    assert set(CONFIGS) == set(REPOS) == set(CONFIG_REPOS) | set(VARIANT_REPOS)
    defaults = {p["pretrained_model_name_or_path"] for p in DIFFUSERS_DEFAULT_PIPELINE_PATHS.values()}
    assert set(REPOS.values()) <= defaults
    for key, files in CONFIGS.items():
        pipelines = FAMILIES[key.split("/")[0]].pipelines
        assert files["model_index.json"]["_class_name"] in pipelines.values(), key


def test_config_repo_files_serialize_the_configs_with_tiny_tokenizers():
    for key, configs in CONFIGS.items():
        files = config_repo_files(key)
        assert files == config_repo_files(key)  # deterministic bytes: a stable commit on the fake Hub
        for path, content in configs.items():
            loaded = json.loads(files[path])
            if path.endswith("tokenizer_config.json"):
                assert loaded["model_max_length"] == content["model_max_length"]
                loaded.pop("added_tokens_decoder", None)  # re-keyed to the tiny vocabulary
                content = {k: v for k, v in content.items() if k != "added_tokens_decoder"}
            assert loaded == json.loads(json.dumps(content)), (key, path)
        for folder in {p.split("/")[0] for p in configs if p.startswith("tokenizer")}:
            tokenizer_class = configs[f"{folder}/tokenizer_config.json"]["tokenizer_class"]
            vocab_files = ("vocab.json", "merges.txt") if tokenizer_class == "CLIPTokenizer" else ("tokenizer.json",)
            assert all(f"{folder}/{f}" in files for f in vocab_files), (key, folder)
        assert not any(p.endswith((".safetensors", ".bin")) for p in files)  # configs only, no weights


def test_pushed_config_repos_serve_a_loadable_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi, constants, hf_hub_download
    from transformers import CLIPTokenizer

    # An in-process serve earlier in this worker (runtime.loader) made huggingface_hub offline.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    hub = FakeHub().start()
    try:
        commits = push_config_repos(hub, ["sd15", "flux-dev"])
        assert set(commits) == {"sd15", "flux-dev"}
        assert hub.repos[REPOS["sd15"]].refs["main"] == commits["sd15"]
        info = HfApi(endpoint=hub.url).model_info(REPOS["sd15"])
        assert info.sha == commits["sd15"]
        names = {s.rfilename for s in info.siblings or []}
        assert names == set(config_repo_files("sd15"))
        for name in names:
            hf_hub_download(REPOS["sd15"], name, endpoint=hub.url, local_dir=tmp_path)
        assert DiffusionPipeline.load_config(tmp_path)["_class_name"] == "StableDiffusionPipeline"
        assert CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer").model_max_length == 77
    finally:
        hub.stop()


# --- (a) every component loads the way from_single_file loads it -----------------------------------


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_every_component_loads_as_diffusers_loads_it(key: str, tmp_path: Path):
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
    from diffusers.loaders.single_file import SINGLE_FILE_OPTIONAL_COMPONENTS

    folder = _write(config_repo_files(key), tmp_path)
    index = DiffusionPipeline.load_config(folder)
    pipeline = getattr(diffusers, index["_class_name"])

    # from_single_file assembles the pipeline from these entries: every one it loads must be a
    # pipeline module, every module it leaves out optional, every other key a pipeline kwarg.
    expected, optional_kwargs = pipeline._get_signature_keys(pipeline)
    loaded = {name for name, _, _ in _components(index)} - set(SINGLE_FILE_OPTIONAL_COMPONENTS)
    assert loaded <= set(expected)
    assert set(expected) - loaded <= set(pipeline._optional_components)
    components = {n for n, v in index.items() if isinstance(v, list)}
    assert {n for n in index if not n.startswith("_")} - components <= set(optional_kwargs)

    for name, library, class_name in _components(index):
        if name in SINGLE_FILE_OPTIONAL_COMPONENTS:
            continue  # never loaded from a single file (safety_checker): no config shipped
        cls = _class(library, class_name)
        if issubclass(cls, ModelMixin):
            config = cls.load_config(folder, subfolder=name)
            assert config["_class_name"] == class_name, name
            model = meta_model(key, name)
            # a key the class does not take would be dropped silently: a typo or a stale field
            unused = set(config) - IGNORED_MODEL_KEYS - set(model.config)
            assert not unused, (name, unused)
        elif issubclass(cls, SchedulerMixin):
            scheduler = cls.from_pretrained(folder, subfolder=name)
            assert type(scheduler).__name__ == class_name
            real = CONFIGS[key][f"{name}/scheduler_config.json"]
            taken = {k: v for k, v in real.items() if k in scheduler.config}
            assert taken == {k: scheduler.config[k] for k in taken}, name
        elif issubclass(cls, transformers.PreTrainedModel):
            config = transformers.AutoConfig.from_pretrained(folder / name)
            assert isinstance(config, cls.config_class), name
            assert config.architectures == [class_name], name
        elif name.startswith("tokenizer"):
            tokenizer = cls.from_pretrained(folder, subfolder=name)
            real = CONFIGS[key][f"{name}/tokenizer_config.json"]
            assert tokenizer.model_max_length == real["model_max_length"], name
            ids = tokenizer("An astronaut riding a horse, 4k.").input_ids
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids[:-1], name
            assert tokenizer.pad_token == real["pad_token"], name
            if real["pad_token"] == "!":
                assert tokenizer.pad_token_id == 0, name  # OpenCLIP pads with id 0, as in the real vocab
        else:
            processor = cls.from_pretrained(folder, subfolder=name)
            assert processor.crop_size["height"] == 224, name


# --- (b) the models are the real models' size -------------------------------------------------------


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_models_have_the_real_parameter_counts(key: str):
    index = CONFIGS[key]["model_index.json"]
    # the components with weights: a config.json each (the safety checker ships none, see (a))
    models = {name for name, _, _ in _components(index) if f"{name}/config.json" in CONFIGS[key]}
    assert models == set(EXPECTED[key])
    for name in sorted(models):
        model = meta_model(key, name)
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert sum(p.numel() for p in model.parameters()) == EXPECTED[key][name], (key, name)


# --- (c) the real single-file layouts convert exactly onto these models ----------------------------

_TORCH_DTYPES = ("float32", "float16", "bfloat16", "int64")


@cache
def _fixture(name: str) -> dict[str, dict[str, dict[str, Any]]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(fixture_path(name.removesuffix(".yaml")).read_text(), Loader=loader)["components"]


def _checkpoint(name: str) -> dict[str, Any]:
    """The fixture's layout as a state dict of meta tensors (a fresh dict: converters pop keys)."""
    import torch

    dtypes = {d: getattr(torch, d) for d in _TORCH_DTYPES}
    return {
        key: torch.empty(spec["shape"], dtype=dtypes.get(spec["dtype"], torch.float32), device="meta")
        for component in _fixture(name).values()
        for key, spec in component.items()
    }


def _numel(fixture: str, component: str, prefix: str = "", skip: tuple[str, ...] = ()) -> int:
    specs = _fixture(fixture)[component]
    return sum(
        math.prod(s["shape"])
        for k, s in specs.items()
        if k.startswith(prefix) and not s.get("optional") and not k.endswith(skip)
    )


def test_counts_are_the_real_checkpoints_sums():
    assert _numel("sd1-ldm.yaml", "clip_l", skip=("position_ids",)) == CLIP_L
    assert _numel("sd1-ldm.yaml", "diffuser") == SD15_UNET
    assert _numel("sd1-ldm.yaml", "vae") == SD_VAE
    assert _numel("sdxl-sgm.yaml", "diffuser") == SDXL_UNET
    assert _numel("sdxl-sgm.yaml", "vae") == SD_VAE
    assert _numel("sd3-comfyui.yaml", "clip_l", skip=("logit_scale",)) == CLIP_L_PROJ
    assert _numel("sd3-comfyui.yaml", "clip_g", skip=("logit_scale",)) == OPENCLIP_G_PROJ
    assert _numel("sd3-comfyui.yaml", "t5xxl", skip=("logit_scale",)) == T5_XXL
    assert _numel("sd3-comfyui.yaml", "vae") == VAE_16
    assert _numel("sd3-comfyui.yaml", "diffuser", "model.diffusion_model.", ("pos_embed",)) == SD3_MMDIT
    assert _numel("flux-flux.yaml", "diffuser") == FLUX_DEV
    assert _numel("flux-flux.yaml", "t5xxl") == T5_XXL
    assert _numel("flux-flux.yaml", "vae") == VAE_16


# family -> (fixture, {diffusers key of the meta model: the single file's key}): hand-picked anchors
# through each component (input and output convs, cross-attention widths, ADM/pooled inputs, the
# deepest block, embedding tables), read before any converter runs.
ANCHORS: dict[str, tuple[str, dict[str, str]]] = {
    "sd15": (
        "sd1-ldm.yaml",
        {
            "unet.conv_in.weight": "model.diffusion_model.input_blocks.0.0.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
            ),
            "unet.down_blocks.0.attentions.0.proj_in.weight": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
            "unet.time_embedding.linear_1.weight": "model.diffusion_model.time_embed.0.weight",
            "unet.conv_out.weight": "model.diffusion_model.out.2.weight",
            "vae.encoder.conv_out.weight": "first_stage_model.encoder.conv_out.weight",
            "vae.quant_conv.weight": "first_stage_model.quant_conv.weight",
            "text_encoder.embeddings.token_embedding.weight": (
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
            ),
            "text_encoder.encoder.layers.11.mlp.fc1.weight": (
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight"
            ),
        },
    ),
    "sdxl": (
        "sdxl-sgm.yaml",
        {
            "unet.conv_in.weight": "model.diffusion_model.input_blocks.0.0.weight",
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
            ),
            "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2.weight": (
                "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight"
            ),
            "unet.add_embedding.linear_1.weight": "model.diffusion_model.label_emb.0.0.weight",
            "unet.add_embedding.linear_2.weight": "model.diffusion_model.label_emb.0.2.weight",
            "unet.conv_out.weight": "model.diffusion_model.out.2.weight",
            "vae.decoder.conv_in.weight": "first_stage_model.decoder.conv_in.weight",
            "text_encoder.embeddings.position_embedding.weight": (
                "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
            ),
            "text_encoder_2.text_model.embeddings.token_embedding.weight": (
                "conditioner.embedders.1.model.token_embedding.weight"
            ),
            "text_encoder_2.text_projection.weight": "conditioner.embedders.1.model.text_projection",
            "text_encoder_2.text_model.encoder.layers.31.mlp.fc1.weight": (
                "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"
            ),
        },
    ),
    "sd3": (
        "sd3-comfyui.yaml",
        {
            "transformer.pos_embed.proj.weight": "model.diffusion_model.x_embedder.proj.weight",
            "transformer.pos_embed.pos_embed": "model.diffusion_model.pos_embed",
            "transformer.context_embedder.weight": "model.diffusion_model.context_embedder.weight",
            "transformer.time_text_embed.text_embedder.linear_1.weight": (
                "model.diffusion_model.y_embedder.mlp.0.weight"
            ),
            "transformer.transformer_blocks.23.ff.net.0.proj.weight": (
                "model.diffusion_model.joint_blocks.23.x_block.mlp.fc1.weight"
            ),
            "transformer.proj_out.weight": "model.diffusion_model.final_layer.linear.weight",
            "vae.encoder.conv_out.weight": "first_stage_model.encoder.conv_out.weight",
            "text_encoder.text_projection.weight": "text_encoders.clip_l.transformer.text_projection.weight",
            "text_encoder_2.text_projection.weight": "text_encoders.clip_g.transformer.text_projection.weight",
            "text_encoder_2.text_model.encoder.layers.31.mlp.fc2.weight": (
                "text_encoders.clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight"
            ),
            "text_encoder_3.shared.weight": "text_encoders.t5xxl.transformer.shared.weight",
            "text_encoder_3.encoder.block.23.layer.1.DenseReluDense.wi_0.weight": (
                "text_encoders.t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wi_0.weight"
            ),
        },
    ),
    "flux-dev": (
        "flux-flux.yaml",
        {
            "transformer.x_embedder.weight": "model.diffusion_model.img_in.weight",
            "transformer.context_embedder.weight": "model.diffusion_model.txt_in.weight",
            "transformer.time_text_embed.guidance_embedder.linear_1.weight": (
                "model.diffusion_model.guidance_in.in_layer.weight"
            ),
            "transformer.time_text_embed.text_embedder.linear_1.weight": (
                "model.diffusion_model.vector_in.in_layer.weight"
            ),
            "transformer.transformer_blocks.18.ff.net.2.weight": (
                "model.diffusion_model.double_blocks.18.img_mlp.2.weight"
            ),
            "transformer.single_transformer_blocks.37.proj_out.weight": (
                "model.diffusion_model.single_blocks.37.linear2.weight"
            ),
            "transformer.proj_out.weight": "model.diffusion_model.final_layer.linear.weight",
            "vae.decoder.conv_in.weight": "vae.decoder.conv_in.weight",
            "text_encoder.embeddings.token_embedding.weight": (
                "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight"
            ),
            "text_encoder_2.shared.weight": "text_encoders.t5xxl.transformer.shared.weight",
        },
    ),
}


@cache
def _state_shapes(key: str, component: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in meta_model(key, component).state_dict().items()}


@pytest.mark.parametrize("family", sorted(ANCHORS))
def test_anchor_shapes_equal_the_real_single_file(family: str):
    fixture, anchors = ANCHORS[family]
    specs = {k: s for component in _fixture(fixture).values() for k, s in component.items()}
    for ours, theirs in anchors.items():
        component, _, path = ours.partition(".")
        assert _state_shapes(family, component)[path] == tuple(specs[theirs]["shape"]), (ours, theirs)


@pytest.mark.parametrize("family", sorted(ANCHORS))
def test_single_file_converts_exactly_onto_the_configs(family: str, tmp_path: Path, monkeypatch):
    """diffusers' own single-file path, on meta tensors: the checkpoint picks this repo, and each
    converted state dict has exactly the model's keys at the model's shapes."""
    from diffusers.loaders import single_file_utils as sfu

    fixture = ANCHORS[family][0]
    checkpoint = _checkpoint(fixture)
    assert sfu.fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"] == CONFIG_REPOS[family]

    def shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in state.items()}

    def converted(name: str) -> dict[str, Any]:
        model = meta_model(family, name)
        if name == "unet":
            return sfu.convert_ldm_unet_checkpoint(dict(checkpoint), model.config)
        if name == "vae":
            # FLUX files keep the autoencoder under "vae."; from_single_file is given a separate
            # ae.safetensors for it, in the LDM layout this prefix swap restores.
            vae = {"first_stage_model." + k[4:] if k.startswith("vae.") else k: v for k, v in checkpoint.items()}
            return sfu.convert_ldm_vae_checkpoint(vae, model.config)
        if family == "sd3":
            return sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))
        return sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))

    index = CONFIGS[family]["model_index.json"]
    for name in ("unet", "transformer", "vae"):
        if name in index:
            assert shapes(converted(name)) == _state_shapes(family, name), name

    # Text encoders: the transformers models are built from our text_encoder*/config.json by
    # diffusers itself; the weight copy is replaced by a check of what would be copied.
    folder = _write(config_repo_files(family), tmp_path)
    handed: dict[str, Any] = {}

    def load_model_dict_into_meta(model: Any, state: dict[str, Any], **kwargs: Any) -> list[str]:
        handed["state"] = state
        return []

    monkeypatch.setattr(sfu, "load_model_dict_into_meta", load_model_dict_into_meta)
    monkeypatch.setattr(sfu, "empty_device_cache", lambda: None)
    tied = {"encoder.embed_tokens.weight"}  # T5's input embedding is tied to shared.weight
    ignorable = {"embeddings.position_ids", "text_projection.weight"}  # buffers / heads the model lacks
    for name, library, class_name in _components(index):
        if not name.startswith("text_encoder"):
            continue
        cls = _class(library, class_name)
        kwargs = {"subfolder": name, "config": str(folder), "local_files_only": True}
        if sfu.is_clip_model_in_single_file(cls, checkpoint):
            model = sfu.create_diffusers_clip_model_from_ldm(cls, checkpoint, **kwargs)
        else:
            assert sfu.is_t5_in_single_file(checkpoint), name
            model = sfu.create_diffusers_t5_model_from_checkpoint(cls, checkpoint, **kwargs)
        ours, theirs = shapes(model.state_dict()), shapes(handed.pop("state"))
        assert set(ours) - set(theirs) <= tied, name
        assert set(theirs) - set(ours) <= ignorable, name
        assert {k: ours[k] for k in set(ours) & set(theirs)} == {k: theirs[k] for k in set(ours) & set(theirs)}, name
