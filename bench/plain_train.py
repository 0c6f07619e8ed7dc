"""The reference for bench/overhead_bench.py: plain Ultralytics training, as a user would run it.

    python -m bench.plain_train DATA_YAML MODEL PROJECT NAME '{"epochs": 8, "imgsz": 64, ...}'

One `YOLO(MODEL).train(data=DATA_YAML, project=PROJECT, name=NAME, **ARGS)` call, nothing else.
The only set-up it shares with train.py is what keeps the comparison fair: Ultralytics offline
with its integrations off (train.py's prepare_ultralytics switches off the same ones, and its
own MLflow run is what is being measured) and the same timestamped logging, to stderr, with
Ultralytics' messages routed through it (train.py's setup_logging).
"""

import json
import logging
import os
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")


def setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel("INFO")


def main() -> None:
    data, model, project, name, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    setup_logging()
    from ultralytics import YOLO, settings
    from ultralytics.utils import LOGGER

    settings.update({"sync": False, "mlflow": False, "clearml": False, "comet": False, "dvc": False, "wandb": False,
                     "tensorboard": False, "raytune": False})
    LOGGER.handlers.clear()
    LOGGER.propagate = True
    YOLO(model).train(data=data, project=project, name=name, exist_ok=True, **args)


if __name__ == "__main__":
    main()
