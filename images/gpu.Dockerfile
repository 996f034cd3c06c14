# vlprep GPU image: detector, CLIP and matcher components (one GPU each).
# Build from the repo root: docker build -f images/gpu.Dockerfile -t REGISTRY/vlprep-gpu:TAG .
# The CUDA runtime comes with the CUDA builds of torch (nvidia-* wheels) and faiss-gpu; the node
# provides the driver (GKE GPU node pools install it).
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

# PyPI's torch 2.14.1 for x86_64 is the CUDA build.
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/vlprep
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
# faiss-gpu replaces faiss-cpu (same `faiss` module, same version)
RUN pip install . \
 && pip uninstall -y faiss-cpu \
 && pip install faiss-gpu==1.15.1 \
 && python -c "import vlprep, kfp, faiss, torch; assert kfp.__version__ == '2.17.0'; assert torch.version.cuda"

WORKDIR /workspace
ENTRYPOINT []
