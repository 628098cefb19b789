"""deploy/k8s/: the worker Deployment, and its two autoscalers (KEDA, plain HPA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.files import host_port
from tests.deploy.k8s import (
    AUTOSCALING,
    autoscaler,
    autoscaling_queries,
    container,
    container_port,
    objects,
    of_kind,
    pod_spec,
    pq_args,
    selected_workloads,
)
from tests.promtool import check


def worker() -> dict[str, Any]:
    return of_kind("Deployment")["pq-worker"]


def secret_files(workload: dict[str, Any]) -> set[str]:
    """The paths secret volumes put in the workload's container."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", []) if "secret" in v}
    return {
        f"{m['mountPath']}/{item['path']}"
        for m in container(workload).get("volumeMounts", [])
        if m["name"] in volumes
        for item in volumes[m["name"]]["secret"].get("items", [])
    }


def test_the_worker_consumes_through_the_balancer_service(tmp_path: Path) -> None:
    w = worker()
    pod = "pq-worker-7d9f-abcde"
    args = pq_args(w, pod, tmp_path)
    assert args.command == "worker"
    assert args.exec or args.http
    assert args.queue
    # The endpoint is the balancers' Service, at its gRPC port, on a balancer's port.
    name, port = host_port(args.endpoint)
    service = of_kind("Service")[name]
    (grpc,) = (p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == port
    (balancer,) = selected_workloads(service["spec"]["selector"])
    assert container_port(container(balancer), grpc.get("targetPort", port)) is not None
    assert str(args.token_file) in secret_files(w), "--token-file is not a mounted secret"
    assert args.consumer_id == pod  # leases say which pod holds them
    # Kubernetes kills at terminationGracePeriodSeconds: after the worker's own graces.
    grace = pod_spec(w)["terminationGracePeriodSeconds"]
    assert grace > args.shutdown_grace_s + args.kill_grace_s


def test_the_worker_is_a_client_not_a_server() -> None:
    w = worker()
    assert "ports" not in container(w)
    assert not [
        s for s in of_kind("Service").values() if w in selected_workloads(s["spec"]["selector"])
    ]


def test_both_autoscalers_scale_the_worker_deployment_with_the_same_policy() -> None:
    keda, hpa = autoscaler("keda-scaledobject.yaml"), autoscaler("hpa.yaml")
    assert (keda["apiVersion"], keda["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    w = worker()
    for obj in (keda, hpa):
        assert "namespace" not in obj["metadata"]
        target = obj["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == (w["apiVersion"], w["kind"])
        assert target["name"] == w["metadata"]["name"]
    k, h = keda["spec"], hpa["spec"]
    assert (k["minReplicaCount"], k["maxReplicaCount"]) == (h["minReplicas"], h["maxReplicas"])
    assert 1 <= h["minReplicas"] < h["maxReplicas"]
    behavior = k["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == h["behavior"]
    # Up at once; down only after a quiet period (seed 002's policy).
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60
    assert k["cooldownPeriod"] >= behavior["scaleDown"]["stabilizationWindowSeconds"]


def test_triggers_read_ready_jobs_per_worker_and_the_oldest_ready_age() -> None:
    queue = pq_args(worker(), "pq-worker-0", Path("/nonexistent")).queue
    keda = autoscaler("keda-scaledobject.yaml")["spec"]["triggers"]
    hpa = autoscaler("hpa.yaml")["spec"]["metrics"]
    ready_k, age_k = keda
    ready_h, age_h = hpa
    # Ready jobs: a target per worker (AverageValue), the same threshold in both.
    assert ready_k["metricType"] == "AverageValue"
    assert f'pq_queue_jobs{{queue="{queue}",state="ready"}}' in ready_k["metadata"]["query"]
    assert ready_h["external"]["metric"]["name"] == "pq_queue_jobs"
    assert ready_h["external"]["metric"]["selector"]["matchLabels"] == {
        "queue": queue,
        "state": "ready",
    }
    assert ready_h["external"]["target"] == {
        "type": "AverageValue",
        "averageValue": ready_k["metadata"]["threshold"],
    }
    # Oldest ready age: a value for the whole queue, not divided by workers.
    assert age_k["metricType"] == "Value"
    assert f'pq_queue_oldest_ready_age_seconds{{queue="{queue}"}}' in age_k["metadata"]["query"]
    assert age_h["external"]["metric"]["name"] == "pq_queue_oldest_ready_age_seconds"
    assert age_h["external"]["metric"]["selector"]["matchLabels"] == {"queue": queue}
    assert age_h["external"]["target"] == {
        "type": "Value",
        "value": age_k["metadata"]["threshold"],
    }
    # Every node exports the same replicated gauges: max() over them, never sum().
    for query in autoscaling_queries():
        assert query.startswith("max("), query


def test_autoscaling_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"autoscaling:q{i}", "expr": q} for i, q in enumerate(autoscaling_queries())
    ]
    path = tmp_path / "autoscaling.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "autoscaling", "rules": rules}]}))
    check("rules", str(path))


def test_autoscalers_are_kept_apart_from_the_default_apply() -> None:
    # `kubectl apply -f deploy/k8s/` is not recursive: neither autoscaler comes
    # with it, so the two never fight over the Deployment.
    assert sorted(p.name for p in AUTOSCALING.iterdir()) == ["hpa.yaml", "keda-scaledobject.yaml"]
    assert not {o["kind"] for o in objects()} & {"ScaledObject", "HorizontalPodAutoscaler"}
