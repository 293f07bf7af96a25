# RunPod serverless worker image. Recipes named in RECIPES are compiled at build time, so a cold
# start only loads finished artifacts and never converts, downloads or compiles.
#   docker build --build-arg RECIPES=demo,my-style -t uiw .
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    UIW_HOME=/opt/uiw/store \
    HF_HOME=/opt/uiw/hf

WORKDIR /app
COPY pyproject.toml README.md ./
COPY compiler ./compiler
COPY runtime ./runtime
COPY bench ./bench
COPY conf ./conf
COPY recipes ./recipes
# torch comes from the base image (a CUDA build); the project's torch range accepts it.
RUN pip install --no-cache-dir .

ARG RECIPES=demo
# HF_TOKEN / CIVITAI_TOKEN, when a recipe needs them, are passed as build secrets, never as ARG/ENV.
RUN set -eu; IFS=','; for r in $RECIPES; do python -m compiler "recipe=$r"; done

# The runtime resolves recipe names through $UIW_HOME/names/; the first one is the default.
ENV UIW_ARTIFACTS=${RECIPES} \
    HF_HUB_OFFLINE=1
CMD ["python", "-m", "runtime"]
