"""The Kubernetes manifests in k8s/: valid against the API's schema, and in step with the trainer.

The schemas come with kubernetes-validate (requirements-dev.txt), offline. It bundles the schemas of
Kubernetes 1.25 to 1.37; the manifests are checked against 1.33, the oldest release that has every
field they use as GA (backoffLimitPerIndex), and 1.37, the newest bundled. Strict mode rejects
fields the schema does not know, so a misspelt field fails here instead of being dropped by
kubectl's client-side pruning.

Some rules the API server enforces are not in the schema (podFailurePolicy needs restartPolicy
Never, an exit-code rule must name a container of the pod); the tests below check those, and the
parts the trainer relies on: the exit codes of the README's table and the shard count.
"""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))
# The README's exit codes and what a Job does with each (README, "Exit codes").
EXIT_CODE_ACTIONS = {1: "Count", 2: "FailJob", 75: "Count", 143: "FailJob"}


def _documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _jobs():
    return [pytest.param(path, doc, id=path.name) for path in MANIFESTS for doc in _documents(path)
            if doc["kind"] == "Job"]


def _env(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_k8s_holds_the_training_and_the_sharded_predict_job():
    assert {p.name for p in MANIFESTS} >= {"job.yaml", "predict-indexed-job.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schema(manifest, version):
    documents = _documents(manifest)
    assert documents, f"{manifest.name} holds no resource"
    for doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{manifest.name}: {doc['kind']} {doc['metadata']['name']} at "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


def test_schema_check_rejects_a_misspelt_field():
    job = _documents(ROOT / "k8s" / "job.yaml")[0]
    job["spec"]["backofLimit"] = job["spec"].pop("backoffLimit")
    with pytest.raises(kubernetes_validate.ValidationError, match="backofLimit"):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("path,job", _jobs())
def test_job_acts_on_every_exit_code_of_the_readme(path, job):
    readme_codes = {int(c) for c in re.findall(r"^\| `(\d+)` \|", (ROOT / "README.md").read_text(), re.M)}
    assert readme_codes - {0} == set(EXIT_CODE_ACTIONS), "the README's exit codes changed: update this table"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    actions = {code: rule["action"] for rule in rules if "onExitCodes" in rule
               for code in rule["onExitCodes"]["values"]}
    assert actions == EXIT_CODE_ACTIONS
    # Preemption and node drains replace the pod without using up a retry.
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules


@pytest.mark.parametrize("path,job", _jobs())
def test_job_meets_the_api_servers_rules_for_pod_failure_policies(path, job):
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    names = {c["name"] for c in pod["containers"]}
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            # A rule naming no container of the pod would never match: the codes would all count.
            assert rule["onExitCodes"]["containerName"] in names


@pytest.mark.parametrize("path,job", _jobs())
def test_job_runs_as_the_images_non_root_user_with_work_and_shm_volumes(path, job):
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "/work" in mounts
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("path,job", _jobs())
def test_job_takes_credentials_from_secrets_only(path, job):
    for container in job["spec"]["template"]["spec"]["containers"]:
        literal = [e["name"] for e in container.get("env", [])
                   if re.search("SECRET|TOKEN|PASSWORD|ACCESS_KEY", e["name"]) and "value" in e]
        assert literal == [], "credentials written into the manifest instead of taken from a Secret"


@pytest.mark.parametrize("path,job", _jobs())
def test_job_container_is_locked_down_with_writable_work_and_tmp(path, job):
    for container in job["spec"]["template"]["spec"]["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        # With a read-only root these are the only writable paths; torch fails at import without a
        # writable /tmp (make image-check found it).
        assert {"/work", "/tmp", "/dev/shm"} <= {m["mountPath"] for m in container["volumeMounts"]}


def test_predict_job_gives_each_index_one_shard_of_the_input():
    job = _documents(ROOT / "k8s" / "predict-indexed-job.yaml")[0]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    env = _env(container)
    assert container["args"] == ["predict.py"]
    # predict.py splits the listing into PREDICT_SHARDS parts; Kubernetes runs `completions` indexes.
    assert int(env["PREDICT_SHARDS"]) == spec["completions"]
    assert spec["parallelism"] <= spec["completions"]
    assert env["INPUT_URI"].endswith("/") and env["PREDICT_OUTPUT_URI"].endswith("/")
    assert env["CHECKPOINT_URI"]
    # Kubernetes sets JOB_COMPLETION_INDEX itself; a value here would give every pod the same shard.
    assert "JOB_COMPLETION_INDEX" not in env
    # Retries are counted per shard, and only on a Job whose pods are never restarted in place.
    assert spec["backoffLimitPerIndex"] >= 1 and "backoffLimit" not in spec
