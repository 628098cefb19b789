"""deploy/k8s/: the objects fit together, and the pq commands parse in every pod."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deploy.dockerfile import stages
from tests.deploy.files import IMAGE, host_port
from tests.deploy.k8s import (
    WORKLOADS,
    container,
    container_port,
    kubelet_expand,
    objects,
    of_kind,
    pod_labels,
    pod_spec,
    pq_args,
    selected_workloads,
    the,
)

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def sts() -> dict[str, Any]:
    return the("StatefulSet")


def balancer() -> dict[str, Any]:
    return of_kind("Deployment")["pq-balancer"]


def worker() -> dict[str, Any]:
    return of_kind("Deployment")["pq-worker"]


#: The workloads that serve gRPC and metrics (a worker is a client: it serves nothing).
SERVERS = ("StatefulSet/pq", "Deployment/pq-balancer")


def server(name: str) -> dict[str, Any]:
    kind, _, obj = name.partition("/")
    return of_kind(kind)[obj]


def peer_addresses() -> dict[int, str]:
    """Node id -> the stable name the StatefulSet gives pod ``ordinal`` on its gRPC port."""
    s = sts()
    grpc_port = container_port(container(s), "grpc")
    return {
        i + 1: f"{s['metadata']['name']}-{i}.{s['spec']['serviceName']}:{grpc_port}"
        for i in range(s["spec"]["replicas"])
    }


def workloads() -> list[dict[str, Any]]:
    return [o for o in objects() if o["kind"] in WORKLOADS]


def test_kubelet_expand() -> None:
    env = {"A": "x"}
    assert kubelet_expand("$(A) $$(A) $(B) $((1 + 2)) ${A##*-} $", env) == (
        "x $(A) $(B) $((1 + 2)) ${A##*-} $"
    )


def test_manifests_are_namespace_agnostic_objects() -> None:
    found = objects()
    kinds = sorted(o["kind"] for o in found)
    assert kinds == [
        "Deployment",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "StatefulSet",
    ]
    for o in found:
        assert o.get("apiVersion"), o
        assert o["metadata"].get("name"), o
        assert "namespace" not in o["metadata"], "kubectl apply -n picks the namespace"
    keys = [(o["kind"], o["metadata"]["name"]) for o in found]
    assert len(keys) == len(set(keys)), "an object defined twice"


def test_statefulset_has_an_odd_majority_and_parallel_start() -> None:
    spec = sts()["spec"]
    assert spec["replicas"] >= 3
    assert spec["replicas"] % 2 == 1, "an even count adds no fault tolerance"
    assert spec["podManagementPolicy"] == "Parallel", "peers must come up together"


def test_statefulset_service_is_headless_and_publishes_unready_pods() -> None:
    s = sts()
    service = of_kind("Service").get(s["spec"]["serviceName"])
    assert service is not None, f"no Service {s['spec']['serviceName']}"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert selected_workloads(service["spec"]["selector"]) == [s]
    # The port peers dial for consensus over TCP (--peer-ports), named.
    assert "peer" in {p.get("targetPort") for p in service["spec"]["ports"]}


def test_workload_selectors_match_their_pods() -> None:
    for w in workloads():
        match = w["spec"]["selector"]["matchLabels"]
        assert match.items() <= pod_labels(w).items(), w["metadata"]["name"]


def test_services_select_pods_that_have_their_target_ports() -> None:
    for name, service in of_kind("Service").items():
        chosen = selected_workloads(service["spec"]["selector"])
        assert chosen, f"Service {name} selects no pods"
        for w in chosen:
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert container_port(container(w), target) is not None, (
                    f"Service {name}: {w['metadata']['name']} has no port {target}"
                )


def test_disruption_budget_keeps_a_quorum() -> None:
    pdb = the("PodDisruptionBudget")
    assert selected_workloads(pdb["spec"]["selector"]["matchLabels"]) == [sts()]
    assert pdb["spec"]["minAvailable"] == sts()["spec"]["replicas"] // 2 + 1


@pytest.mark.parametrize("kind", SERVERS)
def test_probes_use_container_ports(kind: str) -> None:
    c = container(server(kind))
    assert {"readinessProbe", "livenessProbe"} <= set(c), f"{kind}: no readiness or liveness"
    for probe in (c[p] for p in PROBES if p in c):
        ((action, spec),) = ((k, v) for k, v in probe.items() if isinstance(v, dict))
        assert action in ("grpc", "tcpSocket", "httpGet"), action
        if action == "grpc":
            assert isinstance(spec["port"], int), "a gRPC probe's port is a number"
        assert container_port(c, spec["port"]) is not None, f"{kind}: no port {spec['port']}"
    assert "grpc" in c["readinessProbe"], f"{kind}: ready is gRPC health SERVING"


@pytest.mark.parametrize("kind", [*SERVERS, "Deployment/pq-worker"])
def test_pods_run_our_image_as_its_non_root_user(kind: str) -> None:
    w = server(kind)
    spec, c = pod_spec(w), container(w)
    (user,) = stages()[-1].all("USER")
    uid = int(user.args.split(":")[0])
    assert c["image"] == IMAGE
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid
    assert c["resources"]["requests"], f"{kind}: no resource requests"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("kind", SERVERS)
def test_scrape_annotations_name_the_metrics_port(kind: str, tmp_path: Path) -> None:
    w = server(kind)
    annotations = w["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    port = int(annotations["prometheus.io/port"])
    assert port == container_port(container(w), "metrics")
    pod = f"{w['metadata']['name']}-0"
    assert host_port(pq_args(w, pod, tmp_path).metrics_listen) == ("0.0.0.0", port)


def test_node_command_parses_in_every_pod(tmp_path: Path) -> None:
    s = sts()
    c = container(s)
    (claim,) = s["spec"]["volumeClaimTemplates"]
    (data_mount,) = (m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    peers = peer_addresses()
    for ordinal in range(s["spec"]["replicas"]):
        pod = f"{s['metadata']['name']}-{ordinal}"
        args = pq_args(s, pod, tmp_path)
        assert args.command == "node"
        assert args.node_id == ordinal + 1, pod
        assert args.peers == peers, f"{pod}: --peers"
        assert peers[args.node_id].startswith(f"{pod}."), f"{pod} is not its own entry"
        assert host_port(args.listen) == ("0.0.0.0", container_port(c, "grpc"))
        # Consensus over TCP on the named peer port, which the peers' service publishes.
        assert args.peer_ports == container_port(c, "peer"), f"{pod}: --peer-ports"
        assert str(args.data_dir) == data_mount["mountPath"]
        assert args.store in (None, f"sqlite:{data_mount['mountPath']}")
        assert args.log_format == "json"
        # Listening beyond loopback needs auth: the key comes from a mounted secret.
        assert not args.insecure_no_auth
        assert mounted_secret(s, str(args.auth_key_file)), f"{pod}: --auth-key-file"
        assert mounted_secret(s, str(args.peer_token_file)), f"{pod}: --peer-token-file"
        # Each node its own peer token (sub node:<id>): none speaks for another.
        assert str(args.peer_token_file).endswith(f"-{args.node_id}"), f"{pod}: its own token"


def mounted_secret(workload: dict[str, Any], path: str) -> bool:
    """Whether ``path`` is a file a secret volume puts in the container."""
    c, volumes = container(workload), pod_spec(workload).get("volumes", [])
    for mount in c.get("volumeMounts", []):
        for volume in volumes:
            if volume["name"] != mount["name"] or "secret" not in volume:
                continue
            for item in volume["secret"].get("items", []):
                if f"{mount['mountPath']}/{item['path']}" == path:
                    return True
    return False


def test_balancer_backends_are_the_peer_addresses(tmp_path: Path) -> None:
    b = balancer()
    args = pq_args(b, f"{b['metadata']['name']}-0", tmp_path)
    assert (args.command, args.action) == ("balancer", "run")
    assert sorted(args.backends) == sorted(peer_addresses().values())
    assert host_port(args.listen) == ("0.0.0.0", container_port(container(b), "grpc"))
    assert args.log_format == "json"
    assert mounted_secret(b, str(args.probe_token_file)), "--probe-token-file"
    assert mounted_secret(b, str(args.balancer_token_file)), "--balancer-token-file"
    service = of_kind("Service")["pq"]
    assert selected_workloads(service["spec"]["selector"]) == [b]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc": 7700, "metrics": 9700}
