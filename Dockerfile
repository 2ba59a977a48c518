# CUDA image of ablation-response. Build:  docker build -t ablation-response .
# Run on a GPU:  docker run --gpus all -v /path/to/export:/data/export:ro -v $PWD/out:/data/out \
#                  ablation-response assess /data/export --out /data/out --device cuda
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PREFECT_LOGGING_LEVEL=WARNING PREFECT_HOME=/tmp/prefect
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ablation-response
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA 12.8 index, so that the project's range is already satisfied.
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY models ./models
COPY flows ./flows
COPY configs ./configs
# Editable install keeps configs/ beside the code (load_config reads configs/default.yaml).
RUN pip install --no-cache-dir -e .

ENTRYPOINT ["ablation-response"]
CMD ["--help"]
