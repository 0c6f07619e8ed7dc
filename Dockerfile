# The trainer image: `docker run IMAGE` trains, `docker run IMAGE predict.py` predicts.
# torch's CUDA wheels bring their own CUDA libraries: the host needs only the NVIDIA driver
# and container toolkit (or runs on CPU).
FROM python:3.11-slim

# Shared libraries OpenCV (used by Ultralytics) loads at import time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# every top-level module: the trainer is flat, one module per concern
COPY *.py ./

# Run as an unprivileged user; /work holds datasets, weights and run outputs (mount a volume there).
RUN useradd --create-home --uid 10001 trainer && mkdir -p /work && chown trainer /work
USER 10001
ENV WORK_DIR=/work \
    YOLO_OFFLINE=1 \
    MPLCONFIGDIR=/work/.matplotlib \
    PYTHONUNBUFFERED=1

ENTRYPOINT ["python"]
CMD ["train.py"]
