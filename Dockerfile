# gemma4's OpenAI-compatible server on an NVIDIA GPU (usage: docs/docker.md).
#
#   docker build -t gemma4 .
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface gemma4
#
# The CUDA 13 base and torch's cu130 wheels need an NVIDIA driver >= 580; for an older driver build with
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.0-runtime-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

# Triton compiles a small C launcher for its kernels when they first run: it needs a C compiler and Python's headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1

# torch first, from the CUDA index (its own layer: it changes far less often than the package).
RUN pip install --no-cache-dir torch --index-url ${TORCH_INDEX}
WORKDIR /opt/gemma4
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir '.[gpu]'

EXPOSE 8000
ENTRYPOINT ["gemma4", "serve"]
# The model and the server's flags; `docker run IMAGE MODEL --host 0.0.0.0 ...` replaces all of them (keep
# --host 0.0.0.0: the default 127.0.0.1 is unreachable from outside the container).
CMD ["google/gemma-4-E2B-it", "--host", "0.0.0.0", "--port", "8000"]
