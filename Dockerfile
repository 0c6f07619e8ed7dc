# The trainer image: `docker run IMAGE` trains, `docker run IMAGE predict.py` predicts.
# torch's CUDA wheels (torch 2.14.1, built for CUDA 13.0) bring their own CUDA libraries: the host
# needs only an NVIDIA driver new enough for CUDA 13 and the container toolkit, or runs on CPU.
# Run with --shm-size=8g (or --ipc=host): data loader workers share batches through /dev/shm.
# docs/operations.md has the details; `make image-check` tests this file's contract without Docker.
#
# The Debian release is named: `3.11-slim` moves to the next one (new glibc, renamed packages)
# without notice.
FROM python:3.11-slim-trixie

# Shared libraries OpenCV (used by Ultralytics) loads at import time. Their versions are not pinned:
# Debian replaces a package's version in its archive with every point release and security fix, so
# a pinned version stops being installable and the next rebuild fails. The release is pinned above.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# Every top-level module: the entry points import each other's helpers, and the module list changes.
# .dockerignore admits only these and requirements.txt to the build context.
COPY *.py ./

# Run as an unprivileged user; /work holds datasets, weights and run outputs (mount a volume there).
# --no-log-init: useradd would otherwise write a sparse lastlog sized for uid 10001 into the layer.
RUN useradd --no-log-init --create-home --uid 10001 trainer && mkdir -p /work && chown trainer /work
USER 10001
# Caches go under /work too: torch creates its compile cache folder (default /tmp/torchinductor_<user>)
# whenever Ultralytics imports it, and HOME and /tmp may be read-only or gone with the container.
ENV WORK_DIR=/work \
    YOLO_OFFLINE=1 \
    MPLCONFIGDIR=/work/.matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/work/.torchinductor \
    PYTHONUNBUFFERED=1

ENTRYPOINT ["python"]
CMD ["train.py"]
