"""Simulates Ultralytics' multi-GPU relaunch without GPUs, in two processes like the real one.

    python -m tests.ddp_sim parent OUT.pkl   # train.py's side: build the callbacks, cloudpickle them
    RANK=0 python -m tests.ddp_sim worker OUT.pkl LAST.pt   # a DDP worker: unpickle, run one epoch of hooks

The parent executes train.py's source as the __main__ module (without running main), so its
classes are pickled by value exactly as when `python train.py` launches DDP. The worker drives the
hooks in the order Ultralytics calls them, with a stand-in trainer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def parent(out: Path) -> None:
    import cloudpickle

    import __main__

    sys.path.insert(0, str(ROOT))
    source = (ROOT / "train.py").read_text().replace('if __name__ == "__main__":', "if False:")
    exec(compile(source, str(ROOT / "train.py"), "exec"), __main__.__dict__)
    m = __main__.__dict__
    settings = m["load_settings"](os.environ, "train")
    redact = m["Redactor"].from_environ(os.environ)
    backend = m["Backend"](settings.backend, redact, m["job_dir"](settings) / "events.jsonl")
    tracker = m["Tracker"](settings, redact)
    tracker.start()
    reporter = m["EpochReporter"](settings, redact, backend, tracker, m["StopSignal"](settings.shutdown_timeout))
    callbacks = {event: [hook] for event, hook in reporter.callbacks().items()}
    out.write_bytes(cloudpickle.dumps({"callbacks": callbacks}))  # as ultralytics.utils.dist does
    backend.close()
    print(tracker.run_id)


def worker(payload: Path, last: Path) -> None:
    import pickle

    callbacks = pickle.loads(payload.read_bytes())["callbacks"]  # torch_load with cloudpickle, in effect
    trainer = SimpleNamespace(
        epoch=0, epochs=2, start_epoch=0, stop=False, fitness=0.5, best_fitness=0.5, tloss={"box_loss": 1.5},
        lr={"lr/pg0": 0.01}, args=SimpleNamespace(task="detect", epochs=2, imgsz=64),
        metrics={"metrics/precision(B)": 0.5, "metrics/mAP50(B)": 0.25, "val/box_loss": 1.2},
        last=last, best=last, csv=last.with_name("results.csv"),
        validator=SimpleNamespace(names={0: "rectangle"}, data={"names": {0: "rectangle"}}, metrics=SimpleNamespace(
            ap_class_index=[0], nt_per_class=[2], box=SimpleNamespace(ap50=[0.25], ap=[0.1], p=[0.5], r=[0.4]))),
        label_loss_items=lambda loss, prefix: {f"{prefix}/{k}": v for k, v in loss.items()},
    )
    trainer.csv.write_text("epoch,time\n1,1.0\n")
    for event in ("on_pretrain_routine_end", "on_train_start", "on_train_batch_end", "on_train_epoch_end",
                  "on_model_save", "on_fit_epoch_end", "on_train_end"):
        for hook in callbacks[event]:
            hook(trainer)


if __name__ == "__main__":
    if sys.argv[1] == "parent":
        parent(Path(sys.argv[2]))
    else:
        worker(Path(sys.argv[2]), Path(sys.argv[3]))
