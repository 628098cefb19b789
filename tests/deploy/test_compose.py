"""deploy/docker-compose.yml: builds, mounts, ports, and the pq commands wired together."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.compose import (
    command,
    compose,
    container_ports,
    mounts,
    pq_args,
    pq_services,
    published_ports,
    resolve_in_container,
    services,
)
from tests.deploy.dockerfile import stages
from tests.deploy.files import (
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    DEPLOY,
    PROMETHEUS,
    host_port,
    load_yaml,
)

PQ_SERVICES = sorted(pq_services())
#: The services that serve gRPC and metrics (a worker is a client: it serves
#: nothing; pq web serves HTTP only, checked by its own tests below).
SERVERS = sorted(n for n, s in pq_services().items() if pq_args(s).command in ("node", "balancer"))


def nodes() -> dict[str, Any]:
    """Node service -> its parsed ``pq node`` arguments."""
    return {name: pq_args(s) for name, s in pq_services().items() if pq_args(s).command == "node"}


def balancers() -> dict[str, Any]:
    """Balancer service -> its parsed ``pq balancer run`` arguments."""
    return {
        name: args
        for name, s in pq_services().items()
        if (args := pq_args(s)).command == "balancer" and args.action == "run"
    }


def only_service(image_prefix: str) -> str:
    """The one service running an image whose name starts with ``image_prefix``."""
    found = [n for n, s in services().items() if str(s.get("image", "")).startswith(image_prefix)]
    assert len(found) == 1, f"expected one {image_prefix} service, found {found}"
    return found[0]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency -> condition (the list form means service_started)."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def workers() -> dict[str, Any]:
    """Worker service -> its parsed ``pq worker`` arguments."""
    return {name: a for name, s in pq_services().items() if (a := pq_args(s)).command == "worker"}


def webs() -> dict[str, Any]:
    """``pq web`` service -> its parsed arguments."""
    return {name: a for name, s in pq_services().items() if (a := pq_args(s)).command == "web"}


def test_the_cluster_is_three_nodes_a_balancer_a_worker_and_the_web() -> None:
    assert sorted(nodes()) == ["n1", "n2", "n3"]
    assert sorted(balancers()) == ["balancer"]
    assert sorted(workers()) == ["worker"]
    assert sorted(webs()) == ["web"]
    assert len(PQ_SERVICES) == 6, "every service of our image is a node, balancer, worker or web"


def test_web_talks_to_the_balancer_and_is_published() -> None:
    """The dashboard and /v1/ API: behind the balancer, on 0.0.0.0, port published."""
    (name, args), *_ = webs().items()
    service = services()[name]
    (bal_name, bal_args), *_ = balancers().items()
    assert args.endpoint == f"{bal_name}:{host_port(bal_args.listen)[1]}"
    assert depends_on(service) == {bal_name: "service_healthy"}
    host, port = host_port(args.listen)
    assert host == "0.0.0.0", f"{name}: --listen {args.listen} is unreachable from the host"
    assert published_ports(service) == {port: port}


def test_builds_name_existing_dockerfiles() -> None:
    built = {name: s["build"] for name, s in services().items() if "build" in s}
    assert set(PQ_SERVICES) <= set(built), "every pq service builds the image (up --build)"
    for name, build in built.items():
        assert isinstance(build, dict), f"{name}: build with context and dockerfile"
        context = (DEPLOY / build["context"]).resolve()
        assert context.is_dir(), f"{name}: build context {context} is missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"


def test_bind_mounts_exist_and_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for mount in mounts(service):
            if mount.bind:
                assert mount.host_path().exists(), f"{name}: {mount.source} does not exist"
            else:
                assert mount.source in declared, f"{name}: volume {mount.source} is not declared"


@pytest.mark.parametrize("name", SERVERS)
def test_pq_command_parses(name: str) -> None:
    args = pq_args(services()[name])  # fails on an unknown flag or a bad value
    assert args.command in ("node", "balancer")
    assert args.log_format == "json"
    assert args.metrics_listen, f"{name}: no --metrics-listen, Prometheus scrapes it"


@pytest.mark.parametrize("name", SERVERS)
def test_listen_addresses_are_reachable(name: str) -> None:
    service = services()[name]
    args = pq_args(service)
    for flag, address in (("--listen", args.listen), ("--metrics-listen", args.metrics_listen)):
        host, port = host_port(address)
        assert host == "0.0.0.0", f"{name}: {flag} {address} is unreachable from other containers"
        assert port in container_ports(service), f"{name}: {flag} port {port} not exposed"


def test_each_node_keeps_its_data_dir_on_its_own_volume() -> None:
    seen: dict[str, str] = {}
    for name, args in nodes().items():
        volumes = [
            m.source for m in mounts(services()[name]) if str(m.target) == str(args.data_dir)
        ]
        assert volumes, f"{name}: --data-dir {args.data_dir} is not on a volume"
        assert volumes[0] not in seen, f"{name} and {seen.get(volumes[0])} share a data volume"
        seen[volumes[0]] = name


def test_peers_are_the_node_services_at_their_listen_ports() -> None:
    found = nodes()
    expected = {args.node_id: f"{name}:{host_port(args.listen)[1]}" for name, args in found.items()}
    assert sorted(expected) == list(range(1, len(found) + 1)), "node ids are 1..N, once each"
    for name, args in found.items():
        assert args.peers == expected, f"{name}: --peers does not name every node as it listens"


def test_every_node_takes_its_peers_on_an_exposed_peer_port() -> None:
    """Consensus over TCP (``--peer-ports``): one port, the same on every node,
    reachable from the other containers."""
    found = nodes()
    for name, args in found.items():
        assert isinstance(args.peer_ports, int), f"{name}: --peer-ports is one port for all"
        assert args.peer_ports in container_ports(services()[name]), f"{name}: not exposed"
    assert len({args.peer_ports for args in found.values()}) == 1


def test_balancer_backends_are_the_nodes_at_their_listen_ports() -> None:
    expected = sorted(f"{name}:{host_port(args.listen)[1]}" for name, args in nodes().items())
    for name, args in balancers().items():
        assert sorted(args.backends) == expected, name


def test_nodes_share_postgres_each_in_its_own_schema() -> None:
    pg_name = only_service("postgres:")
    postgres = services()[pg_name]
    env = postgres["environment"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    schemas = set()
    for name, args in nodes().items():
        dsn = urlsplit(args.store)
        assert dsn.scheme == "postgresql", f"{name}: not on PostgreSQL"
        assert (dsn.hostname, dsn.port or 5432) == (pg_name, 5432), name
        assert (dsn.username, dsn.password) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
        assert dsn.path.lstrip("/") == env["POSTGRES_DB"], name
        assert args.pg_schema == f"pq_n{args.node_id}", name
        schemas.add(args.pg_schema)
        assert depends_on(services()[name]).get(pg_name) == "service_healthy", name
    assert len(schemas) == len(nodes()), "two nodes share a schema"


@pytest.mark.parametrize("name", SERVERS)
def test_healthcheck_asks_the_grpc_port(name: str) -> None:
    service = services()[name]
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pq-healthcheck"], f"{name}: {test}"
    assert test[2] == f"127.0.0.1:{host_port(pq_args(service).listen)[1]}", name
    installed = {
        c.operands()[-1] for s in stages()[-1:] for c in s.all("COPY") if "from" not in c.flags()
    }
    assert "/usr/local/bin/pq-healthcheck" in installed, "the image does not install it"


def test_published_ports() -> None:
    """What docs/operations.md ("Deploying") points at: localhost 7700 (gRPC),
    9700 (metrics), 9090, 3000."""
    (bal_name, bal_args), *_ = balancers().items()
    bal = published_ports(services()[bal_name])
    assert bal == {7700: host_port(bal_args.listen)[1], 9700: host_port(bal_args.metrics_listen)[1]}
    assert published_ports(services()[only_service("prom/prometheus:")]) == {9090: 9090}
    assert published_ports(services()[only_service("grafana/grafana")]) == {3000: 3000}
    for name in nodes():
        assert not published_ports(services()[name]), f"{name} is reached through the balancer"


def test_nodes_run_open_only_because_nothing_outside_reaches_them() -> None:
    """`pq node` refuses a non-loopback address without auth unless told; compose tells
    it, and that is safe only while no node port is published."""
    for name, args in nodes().items():
        assert args.auth_key_file is not None or args.insecure_no_auth, name
        if args.insecure_no_auth:
            assert not published_ports(services()[name]), name


def test_prometheus_scrapes_every_pq_service_at_its_metrics_port() -> None:
    config = load_yaml(PROMETHEUS)
    jobs = {
        job["job_name"]: sorted(t for sc in job["static_configs"] for t in sc["targets"])
        for job in config["scrape_configs"]
    }
    assert jobs == {
        "pqueue-nodes": sorted(f"{n}:{host_port(a.metrics_listen)[1]}" for n, a in nodes().items()),
        "pqueue-balancer": sorted(
            f"{n}:{host_port(a.metrics_listen)[1]}" for n, a in balancers().items()
        ),
    }
    prom = services()[only_service("prom/prometheus:")]
    config_file = next(a for a in command(prom) if a.startswith("--config.file="))
    mounted = resolve_in_container(prom, config_file.partition("=")[2])
    assert mounted == PROMETHEUS.resolve(), "Prometheus does not read deploy/prometheus.yml"


def test_grafana_reads_the_provisioning_and_the_dashboard() -> None:
    grafana = services()[only_service("grafana/grafana")]
    provisioning = resolve_in_container(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None, "/etc/grafana/provisioning is not mounted"
    assert provisioning / "datasources" / "prometheus.yml" == DATASOURCES.resolve()
    assert provisioning / "dashboards" / "pqueue.yml" == DASHBOARD_PROVIDERS.resolve()
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    folder = resolve_in_container(grafana, provider["options"]["path"])
    assert folder is not None, f"{provider['options']['path']} is not mounted"
    assert folder / DASHBOARD.name == DASHBOARD.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert resolve_in_container(grafana, home) == DASHBOARD.resolve()


def test_grafana_data_source_is_the_prometheus_service() -> None:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    url = urlsplit(source["url"])
    prom_name = only_service("prom/prometheus:")
    listen = next(
        (a.partition("=")[2] for a in command(services()[prom_name]) if "listen-address" in a),
        "0.0.0.0:9090",
    )
    assert (url.hostname, url.port) == (prom_name, host_port(listen)[1])


def _seconds(duration: str) -> float:
    """A compose duration (``40s``, ``1m30s``) in seconds."""
    total, number = 0.0, ""
    for ch in duration:
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number) * {"s": 1, "m": 60, "h": 3600}[ch]
            number = ""
    assert not number, f"{duration!r}: a number without a unit"
    return total


def test_the_worker_consumes_through_the_balancer_and_stops_in_time() -> None:
    ((name, args),) = workers().items()
    service = services()[name]
    (bal_name, bal_args), *_ = balancers().items()
    assert host_port(args.endpoint) == (bal_name, host_port(bal_args.listen)[1])
    assert depends_on(service) == {bal_name: "service_healthy"}
    assert args.exec or args.http
    assert not published_ports(service), "a worker serves nothing"
    # compose kills at stop_grace_period: after the worker's own graces, not before.
    grace = _seconds(service["stop_grace_period"])
    assert grace > args.shutdown_grace_s + args.kill_grace_s
