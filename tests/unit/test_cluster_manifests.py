"""cluster/: every KubeRay manifest against the KubeRay CRD schemas (and no key those schemas do
not define: they let unknown fields through, a typo would be dropped silently), every Serve
config (RayService serveConfigV2, jobs/serve/*_app.yaml) against Ray's ServeDeploySchema and
fmray's ServeConfig, RayJob entrypoints against the recipe configs they name, the launcher YAML
against Ray's own ray-schema.json, and one image name across manifests, launcher and Dockerfile.

The CRDs come from ../shared/kuberay-crds/ beside the repository (KubeRay's
ray-operator/config/crd/bases/); without that folder the CRD checks skip.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"
CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
IMAGE_DIR = "/home/ray/fmray"  # WORKDIR of cluster/Dockerfile: the repository's layout
OBJECT_META_KEYS = {"name", "namespace", "labels", "annotations"}
needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(), reason=f"KubeRay CRD schemas not found at {CRD_DIR}"
)


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file:index, document) for every document of cluster/kuberay/*.yaml."""
    docs = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            docs.append((f"{path.name}:{index}", doc))
    return docs


def kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in manifests() if doc["kind"] in CRD_FILES]


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    # libyaml's loader: the three CRDs are 3.3 MB of YAML.
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=yaml.CSafeLoader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return openapi_to_json_schema(version["schema"]["openAPIV3Schema"])


def openapi_to_json_schema(node: Any) -> Any:
    """OpenAPI v3's `nullable: true` as JSON Schema's type union; the rest carries over."""
    if isinstance(node, list):
        return [openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: openapi_to_json_schema(value) for key, value in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Schema violations plus keys the schema does not define, as 'path: message'."""
    schema = crd_schema(doc["kind"])
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'.'.join(str(p) for p in err.absolute_path)}: {err.message}"
        for err in validator.iter_errors(doc)
    ]
    errors += unknown_keys(doc, schema, "")
    extra_meta = set(doc.get("metadata", {})) - OBJECT_META_KEYS
    errors += [f"metadata.{key}: not an ObjectMeta key fmray uses" for key in sorted(extra_meta)]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: {doc.get('apiVersion')!r} is not ray.io/v1")
    return errors


def unknown_keys(node: Any, schema: dict[str, Any], path: str) -> list[str]:
    found = []
    if isinstance(node, dict) and "properties" in schema:
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if key in schema["properties"]:
                found += unknown_keys(value, schema["properties"][key], where)
            elif isinstance(schema.get("additionalProperties"), dict):
                found += unknown_keys(value, schema["additionalProperties"], where)
            else:
                found.append(f"{where}: not a field of the schema")
    elif isinstance(node, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in node.items():
            found += unknown_keys(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(node):
            found += unknown_keys(item, schema["items"], f"{path}[{index}]")
    return found


def test_the_manifests_exist() -> None:
    kinds = sorted(doc["kind"] for _, doc in manifests())
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob", "RayService"]


@needs_crds
@pytest.mark.parametrize(("name", "doc"), kuberay_docs(), ids=[n for n, _ in kuberay_docs()])
def test_manifest_matches_the_kuberay_crd(name: str, doc: dict[str, Any]) -> None:
    assert crd_errors(doc) == []


@needs_crds
def test_the_check_rejects_typos_wrong_types_and_missing_fields() -> None:
    """The same check on broken copies of the RayCluster: each fault is reported by path."""
    (cluster,) = [doc for _, doc in kuberay_docs() if doc["kind"] == "RayCluster"]
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    assert crd_errors(typo) == [
        "spec.headGroupSpec.template.spec.containers[0].imagePullPolcy: not a field of the schema",
        "spec.workerGroupSpecs[0].maxReplica: not a field of the schema",
    ]
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    wrong["spec"]["authOptions"]["mode"] = "password"
    del wrong["spec"]["workerGroupSpecs"][0]["groupName"]
    errors = "\n".join(crd_errors(wrong))
    assert "spec.workerGroupSpecs.0.replicas: 'two' is not of type 'integer'" in errors
    assert "spec.authOptions.mode: 'password' is not one of ['disabled', 'token']" in errors
    assert "'groupName' is a required property" in errors


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """The RayCluster spec of every manifest (a RayJob's and a RayService's own cluster)."""
    field = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    return [
        (name, doc["spec"][field[doc["kind"]]] if field[doc["kind"]] else doc["spec"])
        for name, doc in kuberay_docs()
    ]


@pytest.mark.parametrize(
    ("name", "spec"), ray_cluster_specs(), ids=[n for n, _ in ray_cluster_specs()]
)
def test_every_cluster_keeps_token_auth_gpu_workers_and_shared_storage(name: str, spec) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    (claim,) = [d for _, d in manifests() if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert mounts["shared"] == "/mnt/shared"
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]  # Guaranteed QoS, no surprises
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def serve_configs() -> list[tuple[str, dict[str, Any]]]:
    configs = [
        (name, yaml.safe_load(doc["spec"]["serveConfigV2"]))
        for name, doc in kuberay_docs()
        if doc["kind"] == "RayService"
    ]
    for path in sorted((REPO_ROOT / "jobs").rglob("*_app.yaml")):
        configs.append((str(path.relative_to(REPO_ROOT)), yaml.safe_load(path.read_text())))
    return configs


@pytest.mark.parametrize(("name", "config"), serve_configs(), ids=[n for n, _ in serve_configs()])
def test_serve_configs_pass_ray_serve_and_fmray_serve_config(name: str, config) -> None:
    from ray.serve.schema import ServeDeploySchema

    from fmray.serve.app import build_app

    schema = ServeDeploySchema.model_validate(config)
    assert schema.applications
    for app in schema.applications:
        assert app.import_path == "fmray.serve.app:build_app"
        build_app(app.args)  # validates the args as a ServeConfig and builds the app graph


def test_a_bad_serve_config_fails_both_checks() -> None:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from fmray.config import ConfigError
    from fmray.serve.app import build_app

    (config,) = [c for name, c in serve_configs() if name.startswith("rayservice")]
    with pytest.raises(ValidationError, match="http_options.port"):
        ServeDeploySchema.model_validate({**config, "http_options": {"port": "eighty"}})
    args = copy.deepcopy(config["applications"][0]["args"])
    args["deployment"]["num_gpu"] = 1
    with pytest.raises(ConfigError, match="deployment.num_gpu"):
        build_app(args)


def rayjobs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in kuberay_docs() if doc["kind"] == "RayJob"]


@pytest.mark.parametrize(("name", "job"), rayjobs(), ids=[n for n, _ in rayjobs()])
def test_rayjob_runs_a_preset_that_validates(name: str, job: dict[str, Any]) -> None:
    from ray.runtime_env import RuntimeEnv

    from fmray.config import load_config
    from fmray.recipes import get_recipe, recipe_config_class

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "fmray" and argv[2] == "--config"
    get_recipe(argv[1])
    config_path = argv[3]
    assert config_path.startswith(f"{IMAGE_DIR}/jobs/"), "name a preset the image holds"
    local = REPO_ROOT / Path(config_path).relative_to(IMAGE_DIR)
    config = load_config(recipe_config_class(argv[1]), local, argv[4:])
    assert config.run.output_dir.startswith("/mnt/shared/")  # the run outlives the cluster
    RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    # The cluster it brings up has exactly the GPUs the preset asks for.
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        g["replicas"]
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in groups
    )
    assert config.scaling.use_gpu and config.scaling.num_workers == gpus


def ray_launcher_schema() -> dict[str, Any]:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def launcher_configs() -> list[Path]:
    return sorted((CLUSTER / "launcher").glob("*.yaml"))


@pytest.mark.parametrize("path", launcher_configs(), ids=lambda p: p.name)
def test_launcher_config_matches_ray_schema(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    jsonschema.Draft7Validator(ray_launcher_schema()).validate(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert commands.count("RAY_AUTH_MODE=token ray start") == 2


def test_launcher_schema_check_rejects_unknown_keys() -> None:
    (path,) = launcher_configs()
    config = yaml.safe_load(path.read_text())
    config["docker"]["imag"] = config["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError, match="'imag' was unexpected"):
        jsonschema.Draft7Validator(ray_launcher_schema()).validate(config)


def test_one_image_everywhere_and_the_dockerfile_builds_it() -> None:
    import ray

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (tag,) = re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile)
    assert f"docker push {tag}" in dockerfile
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    images = {
        line.split("image:", 1)[1].strip()
        for path in [*(CLUSTER / "kuberay").glob("*.yaml"), *launcher_configs()]
        for line in path.read_text().splitlines()
        if re.match(r"\s*(- )?image: ", line)
    }
    assert images == {tag}
    for copied in re.findall(r"^COPY --chown=\S+ (.+) \S+$", dockerfile, flags=re.M):
        for name in copied.split():
            assert (REPO_ROOT / name).exists(), name
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text()
    assert "!fmray" in ignored and "!jobs" in ignored
