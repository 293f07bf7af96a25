# syntax=docker/dockerfile:1
# RunPod serverless worker image (docs/deploy-runpod.md). Recipes named in RECIPES are compiled at
# build time, so a cold start only loads finished artifacts; a model named at run time (UIW_MODEL,
# UIW_RECIPE) is compiled at worker start instead, onto the network volume when one is mounted.
#   docker build --platform linux/amd64 -t uiw .                          # SDXL baked in (worker-sdxl's model)
#   docker build --platform linux/amd64 --build-arg RECIPES= -t uiw-byom . # no baked model: UIW_MODEL chooses
#   docker build --platform linux/amd64 --secret id=hf_token,env=HF_TOKEN --build-arg RECIPES=my-flux -t uiw-flux .
# The base image is CUDA 12.8 (driver >= 570 on the host; RunPod's "CUDA 12.8" filter).
# torch comes from it (a CUDA build); the project's torch range accepts it.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime AS deps

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /app
# Dependencies only, from pyproject.toml: this layer changes when they do, not with the code.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && python -m pip install --no-cache-dir -r requirements.txt

# The build stage: the project, the downloads and the compile, each in its own layer. Only the
# finished artifacts leave it (below), so the image holds each weight byte once.
FROM deps AS build
ENV UIW_HOME=/opt/uiw/store \
    HF_HOME=/opt/uiw/hf
COPY README.md test_input.json ./
COPY conf ./conf
COPY recipes ./recipes
COPY compiler ./compiler
COPY runtime ./runtime
COPY bench ./bench
RUN python -m pip install --no-cache-dir --no-deps .
ARG RECIPES=sdxl
# Tokens for gated or private models are build secrets, readable only during these two steps and
# never stored in a layer: --secret id=hf_token,env=HF_TOKEN --secret id=civitai_token,env=CIVITAI_TOKEN
# The downloaded blobs live in a build cache, not in a layer: a code edit recompiles from them
# without downloading again, and no layer holds a weight twice.
RUN --mount=type=secret,id=hf_token --mount=type=secret,id=civitai_token \
    --mount=type=cache,id=uiw-blobs,target=/opt/uiw/store/blobs \
    set -eu; \
    HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)"; export HF_TOKEN; \
    CIVITAI_TOKEN="$(cat /run/secrets/civitai_token 2>/dev/null || true)"; export CIVITAI_TOKEN; \
    IFS=','; for r in $RECIPES; do python -m compiler.store fetch "recipe=$r"; done
RUN --mount=type=secret,id=hf_token --mount=type=secret,id=civitai_token \
    --mount=type=cache,id=uiw-blobs,target=/opt/uiw/store/blobs \
    set -eu; \
    HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)"; export HF_TOKEN; \
    CIVITAI_TOKEN="$(cat /run/secrets/civitai_token 2>/dev/null || true)"; export CIVITAI_TOKEN; \
    mkdir -p "$UIW_HOME/artifacts" "$UIW_HOME/names"; \
    IFS=','; for r in $RECIPES; do python -m compiler "recipe=$r"; done

# The image: dependencies, the project, and the artifacts with their names (no blobs, no HF cache).
FROM deps AS image
COPY --from=build /app /app
RUN python -m pip install --no-cache-dir --no-deps .
COPY --from=build /opt/uiw/store/artifacts /opt/uiw/image-store/artifacts
COPY --from=build /opt/uiw/store/names /opt/uiw/image-store/names
ARG RECIPES=sdxl
# The baked store is read first; the store itself is the network volume when one is mounted
# (/runpod-volume/uiw, HF_HOME beside it), else this one. UIW_ARTIFACTS: the baked recipe names,
# the first is the default; a model named by UIW_MODEL/UIW_RECIPE is served first, before them.
ENV UIW_IMAGE_HOME=/opt/uiw/image-store \
    UIW_ARTIFACTS=${RECIPES}
CMD ["python", "-m", "runtime"]
