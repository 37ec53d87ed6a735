"""The deployment files under ops/, checked offline.

Each file is validated by the tool closest to what will consume it: cfn-lint
for the CloudFormation template, botocore's own ECS model for its task
definitions, the Kubernetes OpenAPI schemas bundled by kubernetes-validate
for the manifests, a small JSON schema for KEDA's ScaledObject (a CRD those
schemas do not cover), and plain parsing for compose and the Dockerfile.
The consistency checks then hold every file to the same facts: the roles
`kdcube serve` accepts, their ports and probe paths (PROTOCOL.md), the drain
timeout (kdcube.config), and the metric names the metrics role exports.

Known shortcoming: nothing here builds the image or starts the stack; a
wrong package name in the Dockerfile or a bad image tag in compose only shows
up in a real build.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import botocore.session
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from botocore.validate import ParamValidator
from cfnlint.api import lint_file  # type: ignore[import-untyped]

from kdcube.cli import serve
from kdcube.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
CFN_TEMPLATE = OPS / "ecs" / "kdcube.yaml"
K8S = OPS / "k8s"
K8S_VERSION = "1.37.0"
DEPLOYED_ROLES = ("ingress", "proc", "metrics")
DRAIN_S = int(Settings.model_fields["drain_timeout_s"].default)
# Seconds after the drain for the server to close and the process to exit.
EXIT_MARGIN_S = 10

# The CloudWatch names the ECS alarms read, and the Prometheus metric each is
# published from (PROTOCOL.md lists only the Prometheus side).
CLOUDWATCH_SOURCES = {
    "chat/ingress/sse/saturation": "kdcube_sse_saturation_ratio",
    "chat/proc/queue/utilization": "kdcube_queue_utilization_ratio",
    "chat/proc/queue/wait/p95": "kdcube_queue_wait_seconds",
}


# -- shared facts ------------------------------------------------------------


@cache
def protocol_text() -> str:
    return (ROOT / "PROTOCOL.md").read_text()


@cache
def role_ports() -> dict[str, int]:
    """Each role's default port, as PROTOCOL.md's CLI section states it."""
    found = re.findall(r"`(\w+)` \((?:default port )?(\d+)\)", protocol_text())
    return {role: int(port) for role, port in found}


@cache
def protocol_metrics() -> frozenset[str]:
    section = protocol_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return frozenset(re.findall(r"`(kdcube_\w+?)(?:\{[^}]*\})?`", section))


def exported(series: str) -> bool:
    """Whether a Prometheus series (a histogram's too) is in PROTOCOL.md."""
    base = re.sub(r"_(bucket|sum|count)$", "", series)
    return base in protocol_metrics()


def servable_roles() -> set[str]:
    choice = next(param for param in serve.params if param.name == "role")
    return set(getattr(choice.type, "choices", ()))


def assert_role_command(command: list[str]) -> str:
    assert command[:1] == ["serve"] and len(command) == 2, command
    assert command[1] in servable_roles(), command
    return command[1]


def probe_url_in(command: list[str]) -> str:
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(command))
    assert len(urls) == 1, command
    return str(urls[0])


def test_protocol_names_the_deployed_roles_and_their_ports() -> None:
    assert set(DEPLOYED_ROLES) <= servable_roles()
    assert {role: role_ports()[role] for role in DEPLOYED_ROLES} == {
        "ingress": 8010,
        "proc": 8020,
        "metrics": 8090,
    }


# -- CloudFormation ----------------------------------------------------------


class CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation's short tags (!Ref, !Sub...) into their long form."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


CfnLoader.add_multi_constructor("!", _intrinsic)


@cache
def template() -> dict[str, Any]:
    loaded = yaml.load(CFN_TEMPLATE.read_text(), Loader=CfnLoader)
    assert isinstance(loaded, dict)
    return loaded


def resources_of(kind: str) -> dict[str, dict[str, Any]]:
    return {
        name: resource["Properties"]
        for name, resource in template()["Resources"].items()
        if resource["Type"] == kind
    }


def task_definitions() -> dict[str, dict[str, Any]]:
    return resources_of("AWS::ECS::TaskDefinition")


def containers() -> Iterator[dict[str, Any]]:
    for properties in task_definitions().values():
        yield from properties["ContainerDefinitions"]


def test_cloudformation_passes_cfn_lint() -> None:
    findings = [
        f"{match.rule.id} {match.message} (line {match.linenumber})"
        for match in lint_file(CFN_TEMPLATE)
        if match.rule.id[0] in "EW"
    ]
    assert findings == []


_FUNCTIONS = ("Sub", "GetAtt", "FindInMap", "If", "Join", "Select", "ImportValue")
_PLACEHOLDERS: dict[str, Any] = {
    "string": "placeholder",
    "integer": 60,
    "long": 60,
    "boolean": True,
}


_ABSENT = object()


def is_intrinsic(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) == 1
        and next(iter(value)) in {"Ref"} | {f"Fn::{f}" for f in _FUNCTIONS}
    )


def to_api_params(value: Any, shape: Any) -> Any:
    """CloudFormation properties (PascalCase) as the API's parameters.

    Member names are matched case-insensitively against the botocore shape,
    which is exactly how the two spellings differ; map keys (log options) are
    kept. Intrinsics become a placeholder of the type the shape wants; !If
    takes its first branch, so conditional entries are checked too.
    """
    if is_intrinsic(value):
        return _placeholder(value, shape)
    if shape.type_name == "structure":
        by_lower = {name.lower(): name for name in shape.members}
        params = {}
        for key, item in value.items():
            name = by_lower.get(key.lower(), key)
            member = shape.members.get(name)
            params[name] = item if member is None else to_api_params(item, member)
        return params
    if shape.type_name == "list":
        items = [to_api_params(item, shape.member) for item in value]
        return [item for item in items if item is not _ABSENT]
    if shape.type_name == "map":
        return {key: to_api_params(item, shape.value) for key, item in value.items()}
    if shape.type_name == "string":
        return str(value)
    return value


def _placeholder(value: dict[str, Any], shape: Any) -> Any:
    ((function, args),) = value.items()
    if function == "Fn::If":
        return to_api_params(args[1], shape)
    if function == "Ref" and args == "AWS::NoValue":
        return _ABSENT
    if shape.type_name == "list":
        return [_PLACEHOLDERS.get(shape.member.type_name, "placeholder")]
    return _PLACEHOLDERS[shape.type_name]


@pytest.mark.parametrize("name", sorted(task_definitions()))
def test_task_definition_fits_the_ecs_api(name: str) -> None:
    model = botocore.session.get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    params = to_api_params(task_definitions()[name], shape)

    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()
    assert params["networkMode"] == "awsvpc"
    assert params["requiresCompatibilities"] == ["FARGATE"]


def container_environment(container: dict[str, Any]) -> dict[str, Any]:
    """Variables and secrets by name; a conditional entry counts as present."""
    entries = [
        entry["Fn::If"][1] if "Fn::If" in entry else entry
        for entry in container["Environment"] + container.get("Secrets", [])
    ]
    return {
        entry["Name"]: entry.get("Value", entry.get("ValueFrom")) for entry in entries
    }


def test_each_task_runs_one_role_on_its_port_with_a_health_check() -> None:
    roles = set()
    for container in containers():
        role = assert_role_command(container["Command"])
        roles.add(role)
        assert container["Name"] == role
        assert [m["ContainerPort"] for m in container["PortMappings"]] == [
            role_ports()[role]
        ]
        url = probe_url_in(container["HealthCheck"]["Command"])
        assert url == f"http://127.0.0.1:{role_ports()[role]}/health"
        needed = {"KDCUBE_REDIS_URL", "KDCUBE_POSTGRES_DSN", "KDCUBE_AUTH"}
        if role != "metrics":
            needed.add("KDCUBE_STORAGE_PATH")
        assert needed <= set(container_environment(container)), role
    assert roles == set(DEPLOYED_ROLES)


def test_stop_timeout_covers_the_drain_within_fargate_limits() -> None:
    drain = template()["Parameters"]["DrainTimeoutSeconds"]
    assert int(drain["Default"]) == DRAIN_S
    stop_timeouts = template()["Mappings"]["StopTimeout"]
    for allowed in drain["AllowedValues"]:
        seconds = stop_timeouts[allowed]["Seconds"]
        assert seconds == min(int(allowed) + 15, 120)
        assert seconds >= int(allowed) + EXIT_MARGIN_S

    for container in containers():
        assert container["StopTimeout"] == {
            "Fn::FindInMap": ["StopTimeout", {"Ref": "DrainTimeoutSeconds"}, "Seconds"]
        }
        environment = container_environment(container)
        assert environment["KDCUBE_DRAIN_TIMEOUT_S"] == {"Ref": "DrainTimeoutSeconds"}


def test_task_role_reaches_only_the_storage_bucket() -> None:
    policies = resources_of("AWS::IAM::Role")["TaskRole"]["Policies"]
    statements = [s for p in policies for s in p["PolicyDocument"]["Statement"]]
    assert {
        action
        for statement in statements
        for action in (
            [statement["Action"]]
            if isinstance(statement["Action"], str)
            else statement["Action"]
        )
    } <= {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    for statement in statements:
        assert "${BucketName}" in statement["Resource"]["Fn::Sub"]


def alarm_metric_names() -> set[str]:
    names = set()
    for alarm in resources_of("AWS::CloudWatch::Alarm").values():
        if "MetricName" in alarm:
            names.add(alarm["MetricName"])
        for query in alarm.get("Metrics", []):
            if "MetricStat" in query:
                names.add(query["MetricStat"]["Metric"]["MetricName"])
    return names


def test_alarms_read_the_published_metrics() -> None:
    assert alarm_metric_names() == set(CLOUDWATCH_SOURCES)
    for source in CLOUDWATCH_SOURCES.values():
        assert exported(source), f"{source} is not in PROTOCOL.md's Metrics"


def test_proc_scales_out_on_either_metric_and_in_on_both() -> None:
    alarms = resources_of("AWS::CloudWatch::Alarm")
    out = alarms["ProcScaleOutAlarm"]["Metrics"][0]["Expression"]["Fn::Sub"]
    in_ = alarms["ProcScaleInAlarm"]["Metrics"][0]["Expression"]["Fn::Sub"]
    assert " OR " in out and " AND " in in_

    defaults = {
        name: float(parameter["Default"])
        for name, parameter in template()["Parameters"].items()
        if name.startswith(("ProcScale", "IngressScale"))
    }
    assert defaults == {
        "ProcScaleOutUtilization": 0.7,
        "ProcScaleOutWaitP95Seconds": 3.0,
        "ProcScaleInUtilization": 0.3,
        "ProcScaleInWaitP95Seconds": 1.0,
        "IngressScaleOutSaturation": 0.7,
        "IngressScaleInSaturation": 0.3,
    }


def test_metrics_namespace_defaults_to_kdcube() -> None:
    assert template()["Parameters"]["MetricsNamespace"]["Default"] == "kdcube"


# -- Kubernetes --------------------------------------------------------------

# Kinds the bundled schemas cannot cover: checked by their own tests below.
_NOT_IN_KUBERNETES = {"ScaledObject", "Kustomization"}


@cache
def k8s_documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return tuple(found)


def k8s_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if doc["kind"] == kind]


@pytest.mark.parametrize(
    ("file", "document"),
    [
        pytest.param(file, doc, id=f"{file}:{doc['kind']}")
        for file, doc in k8s_documents()
        if doc["kind"] not in _NOT_IN_KUBERNETES
    ],
)
def test_manifest_fits_the_kubernetes_schema(
    file: str, document: dict[str, Any]
) -> None:
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object"},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"$ref": "#/$defs/trigger"},
                },
            },
        },
    },
    "$defs": {
        "trigger": {
            "type": "object",
            "required": ["type", "metadata"],
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string"},
                "name": {"type": "string"},
                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                "useCachedMetrics": {"type": "boolean"},
                "authenticationRef": {"type": "object"},
                "metadata": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                },
            },
            "if": {"properties": {"type": {"const": "prometheus"}}},
            "then": {
                "properties": {
                    "metadata": {"required": ["serverAddress", "query", "threshold"]}
                }
            },
        }
    },
}


def test_keda_scaled_object_has_a_sound_structure() -> None:
    (scaled,) = k8s_of("ScaledObject")
    jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    deployments = {doc["metadata"]["name"] for doc in k8s_of("Deployment")}
    assert scaled["spec"]["scaleTargetRef"]["name"] in deployments


def test_kustomization_lists_the_base_without_an_autoscaler() -> None:
    (kustomization,) = k8s_of("Kustomization")
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    assert not listed & {"keda-scaledobject.yaml", "hpa.yaml"}


def role_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for deployment in k8s_of("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            yield pod, container


def config_map_drain_s() -> int:
    (config,) = k8s_of("ConfigMap")
    return int(config["data"]["KDCUBE_DRAIN_TIMEOUT_S"])


def pre_stop_sleep_s(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def test_each_deployment_runs_one_role_with_its_probes() -> None:
    roles = set()
    for _, container in role_containers():
        role = assert_role_command(container["args"])
        roles.add(role)
        assert [p["containerPort"] for p in container["ports"]] == [role_ports()[role]]
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert roles == set(DEPLOYED_ROLES)


def test_grace_period_covers_pre_stop_and_drain() -> None:
    assert config_map_drain_s() == DRAIN_S
    for pod, container in role_containers():
        needed = pre_stop_sleep_s(container) + config_map_drain_s() + EXIT_MARGIN_S
        assert pod["terminationGracePeriodSeconds"] >= needed


def test_pods_run_unprivileged_with_resources() -> None:
    for pod, container in role_containers():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"requests", "limits"} <= set(container["resources"])


def test_every_deployment_has_a_service_and_a_disruption_budget() -> None:
    deployments = {doc["metadata"]["name"] for doc in k8s_of("Deployment")}
    assert {doc["metadata"]["name"] for doc in k8s_of("Service")} == deployments
    budgets = {doc["metadata"]["name"] for doc in k8s_of("PodDisruptionBudget")}
    assert budgets == deployments


def adapter_rules() -> dict[str, str]:
    """External metric name -> query, from the adapter rules in the README."""
    readme = (K8S / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    rules = yaml.safe_load(block.group(1))["externalRules"]
    return {rule["name"]["as"]: rule["metricsQuery"] for rule in rules}


def series_in(query: str) -> set[str]:
    return set(re.findall(r"\bkdcube_\w+", query))


def test_autoscalers_read_exported_metrics() -> None:
    (scaled,) = k8s_of("ScaledObject")
    keda_queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    adapter_queries = list(adapter_rules().values())
    for query in keda_queries + adapter_queries:
        assert series_in(query), query
        for series in series_in(query):
            assert exported(series), f"{series} is not in PROTOCOL.md's Metrics"

    (hpa,) = k8s_of("HorizontalPodAutoscaler")
    for metric in hpa["spec"]["metrics"]:
        assert metric["external"]["metric"]["name"] in adapter_rules()


def test_keda_and_ecs_share_the_proc_thresholds() -> None:
    (scaled,) = k8s_of("ScaledObject")
    thresholds = {
        t["name"]: float(t["metadata"]["threshold"]) for t in scaled["spec"]["triggers"]
    }
    parameters = template()["Parameters"]
    assert thresholds == {
        "queue-utilization": float(parameters["ProcScaleOutUtilization"]["Default"]),
        "queue-wait-p95": float(parameters["ProcScaleOutWaitP95Seconds"]["Default"]),
    }


# -- compose -----------------------------------------------------------------

KDCUBE_ENVIRONMENT = {
    "KDCUBE_REDIS_URL",
    "KDCUBE_POSTGRES_DSN",
    "KDCUBE_STORAGE_PATH",
    "KDCUBE_S3_ENDPOINT_URL",
    "KDCUBE_CLAMD",
    "KDCUBE_AUTH",
}
# Services that run once and exit; they need no health check.
ONE_SHOT = {"migrate", "minio-init"}


@cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((OPS / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def kdcube_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("build", {}).get("dockerfile") == "ops/Dockerfile"
    }


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match is not None and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_compose_kdcube_services_have_a_usable_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, service in kdcube_services().items():
        environment = service["environment"]
        assert KDCUBE_ENVIRONMENT <= set(environment), name
        assert environment["KDCUBE_STORAGE_PATH"].startswith("s3://")
        for variable, value in environment.items():
            monkeypatch.setenv(variable, str(value))
        settings = load_settings()
        assert settings.distributed and settings.auth == "dev"
        assert int(environment["KDCUBE_DRAIN_TIMEOUT_S"]) == DRAIN_S


def test_compose_roles_run_their_command_with_a_health_check() -> None:
    roles = set()
    for name, service in kdcube_services().items():
        if name in ONE_SHOT:
            assert service["command"] == ["migrate"]
            continue
        role = assert_role_command(service["command"])
        roles.add(role)
        url = probe_url_in(service["healthcheck"]["test"])
        assert url == f"http://127.0.0.1:{role_ports()[role]}/health"
        needed = DRAIN_S + EXIT_MARGIN_S
        assert seconds(service["stop_grace_period"]) >= needed, name
    # On one host the embedded edge is the front door; ECS and Kubernetes
    # put their own load balancer or Ingress there.
    assert roles == {*DEPLOYED_ROLES, "edge"}


def test_compose_dependencies_exist_and_are_waited_for_properly() -> None:
    services = compose()["services"]
    for name, service in services.items():
        if name not in ONE_SHOT:
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], target
            if rule["condition"] == "service_completed_successfully":
                assert target in ONE_SHOT, target


def test_compose_redis_keeps_an_append_only_file() -> None:
    command = compose()["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, check=False
    )
    if version.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    checked = subprocess.run(
        [docker, "compose", "-f", str(OPS / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


# -- Dockerfile --------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage, continuation lines joined."""
    text = (OPS / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def instruction(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [arguments for found, arguments in stage if found == name]


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def test_dockerfile_builds_in_a_builder_stage_on_slim_bookworm() -> None:
    preamble, *stages = dockerfile_stages()
    (base_arg,) = instruction(preamble, "ARG")
    assert base_arg == "PYTHON_IMAGE=python:3.11-slim-bookworm"
    froms = [instruction(stage, "FROM")[0] for stage in stages]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE} AS runtime"]
    runtime = stages[-1]
    assert any(c.startswith("--from=builder ") for c in instruction(runtime, "COPY"))
    for source in ("pyproject.toml", "README.md", "src", "bundles"):
        assert (ROOT / source).exists(), source


def test_dockerfile_runs_kdcube_as_a_non_root_user() -> None:
    runtime = dockerfile_stages()[-1]
    user = instruction(runtime, "USER")[-1].split(":")[0]
    assert user not in {"root", "0"}
    entrypoint = exec_form(instruction(runtime, "ENTRYPOINT")[-1])
    assert entrypoint[-1] == "kdcube"
    assert_role_command(exec_form(instruction(runtime, "CMD")[-1]))


def test_dockerfile_health_check_probes_health() -> None:
    runtime = dockerfile_stages()[-1]
    (check,) = instruction(runtime, "HEALTHCHECK")
    assert "HEALTHCHECK_URL" in check and "curl" not in check
    environment = " ".join(instruction(runtime, "ENV"))
    url = re.search(r"HEALTHCHECK_URL=(\S+)", environment)
    assert url is not None
    assert url.group(1) == f"http://127.0.0.1:{role_ports()['ingress']}/health"
