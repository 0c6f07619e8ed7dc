"""The reference for bench/predict_bench.py: the plain Ultralytics loop a user would write.

    python -m bench.plain_predict WEIGHTS FOLDER IMGSZ > predictions.json

One `model.predict(path)` call per image, the same JSON document as predict.py on stdout.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

from ultralytics import YOLO  # noqa: E402

from predict import describe_result  # noqa: E402  (same output shape, so only the loop differs)


def main() -> None:
    weights, folder, imgsz = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    model = YOLO(weights)
    predictions = []
    for path in sorted(folder.glob("*.jpg")):
        result = model.predict(str(path), imgsz=imgsz, conf=0.25, device="cpu", verbose=False)[0]
        predictions.append(describe_result(result, str(path)))
    json.dump({"predictions": predictions, "count": len(predictions)}, sys.stdout)


if __name__ == "__main__":
    main()
