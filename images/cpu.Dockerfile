# vlprep CPU image: every non-GPU component (plans, merges, captions, LMDB, indexing).
# Build from the repo root: docker build -f images/cpu.Dockerfile -t REGISTRY/vlprep-cpu:TAG .
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of the pinned torch pair keeps the image small; pyproject's torch==2.14.1 accepts it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1+cpu torchvision==0.29.1+cpu

WORKDIR /opt/vlprep
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
# vlprep with its pinned dependencies, kfp==2.17.0 among them (the version the pipelines compile with)
RUN pip install . && python -c "import vlprep, kfp, faiss; assert kfp.__version__ == '2.17.0'"

WORKDIR /workspace
ENTRYPOINT []
