# make demo   -> venv, sample dataset, a 15-epoch training on local storage (about a minute on 2 CPUs), predictions
# make test   -> the whole test suite (what .ci/run runs)
# make bench  -> the benchmarks (figures for the README's performance table)
# make gpu-check -> the GPU checks, on a machine with CUDA (bench/gpu_check.py)
# make image-check -> the Docker image's contract without Docker, as root (bench/image_check.py, 8-11 min)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := demo

.PHONY: venv test demo bench gpu-check image-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

test: venv
	$(PY) -m pytest

demo: venv
	rm -rf $(DEMO)
	$(PY) -m tests.sample_data --task detect --train 128 --val 32 --out $(DEMO)/shapes --zip $(DEMO)/storage/vision-platform/datasets/demo-shapes.zip
	cd $(DEMO) && env JOB_ID=demo DATASET_ID=demo-shapes MODEL_NAME=yolo11n.yaml TASK_TYPE=object_detection \
		EPOCHS=15 IMGSZ=64 BATCH_SIZE=16 LEARNING_RATE=0.01 STORAGE_TYPE=local LOCAL_STORAGE_DIR=storage WORK_DIR=work \
		../$(PY) ../train.py
	cd $(DEMO) && env JOB_ID=demo INPUT_URI=shapes/images/val IMGSZ=64 STORAGE_TYPE=local LOCAL_STORAGE_DIR=storage \
		WORK_DIR=work ../$(PY) ../predict.py > predictions.json
	@echo
	@echo "demo done:"
	@echo "  checkpoints and outputs: $(DEMO)/storage/vision-platform/checkpoints/job-demo/"
	@echo "  MLflow store:            $(DEMO)/work/mlflow.db  (mlflow ui --backend-store-uri sqlite:///$(DEMO)/work/mlflow.db)"
	@echo "  event log:               $(DEMO)/storage/vision-platform/checkpoints/job-demo/events.jsonl"
	@echo "  predictions:             $(DEMO)/predictions.json ($$($(PY) -c 'import json;print(json.load(open("$(DEMO)/predictions.json"))["count"])') images, $$($(PY) -c 'import json;print(sum(len(p["detections"]) for p in json.load(open("$(DEMO)/predictions.json"))["predictions"]))') detections)"

bench: venv
	$(PY) -m bench.predict_bench
	$(PY) -m bench.callbacks_bench --repeats 3
	$(PY) -m bench.validation_bench
	$(PY) -m bench.overhead_bench
	$(PY) -m bench.fetch_bench --shapes archive
	$(PY) -m bench.fetch_bench --shapes prefix

gpu-check: venv
	$(PY) -m bench.gpu_check

# Needs only the standard library: it makes its own fresh virtual environment from requirements.txt.
image-check:
	$(PYTHON) -m bench.image_check

clean:
	rm -rf $(DEMO) .pytest_cache
