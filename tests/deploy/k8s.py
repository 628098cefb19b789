"""deploy/k8s/ as the tests see it: objects, pods, and a container's argv as kubelet runs it."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from tests.deploy.files import ENTRYPOINT, K8S, load_yaml_documents, parse_pq

WORKLOADS = ("StatefulSet", "Deployment")


def objects() -> list[dict[str, Any]]:
    """Every object of every manifest, in file order."""
    found = []
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in load_yaml_documents(path):
            if doc is not None:
                assert isinstance(doc, dict), f"{path}: a document that is not an object"
                found.append(doc)
    return found


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    """Name -> object, for one kind."""
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == kind}


def the(kind: str) -> dict[str, Any]:
    """The one object of a kind."""
    (found,) = of_kind(kind).values()
    return found


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any]) -> dict[str, Any]:
    """The workload's one container."""
    (found,) = pod_spec(workload)["containers"]
    assert isinstance(found, dict)
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(selector: dict[str, str]) -> list[dict[str, Any]]:
    """The workloads whose pods carry every label of ``selector``."""
    return [o for o in objects() if o["kind"] in WORKLOADS and selects(selector, pod_labels(o))]


def container_port(c: dict[str, Any], port: int | str) -> int | None:
    """The container port a probe or Service names, by number or by name; None if none."""
    for p in c.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            number: int = p["containerPort"]
            return number
    return None


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of command and args: ``$$`` is ``$``, a defined
    ``$(NAME)`` its value; anything else is left as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
        elif text[i + 1] == "$":
            out.append("$")
            i += 2
        elif text[i + 1] == "(" and (end := text.find(")", i + 2)) != -1:
            name = text[i + 2 : end]
            out.append(env.get(name, text[i : end + 1]))
            i = end + 1
        else:
            out.append(text[i : i + 2])
            i += 2
    return "".join(out)


def pod_env(workload: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's environment in pod ``pod_name`` (values and downward API fields)."""
    env = {"HOSTNAME": pod_name}
    fields = {"metadata.name": pod_name, "metadata.namespace": "default"}
    for var in container(workload).get("env", []):
        if "value" in var:
            env[var["name"]] = kubelet_expand(str(var["value"]), env)
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert field in fields, f"{var['name']}: fieldRef {field} is not simulated"
            env[var["name"]] = fields[field]
    return env


def pq_argv(workload: dict[str, Any], pod_name: str, fake_bin: Path) -> list[str]:
    """The arguments ``pq`` receives in pod ``pod_name``, after kubelet's expansion and,
    for a ``sh -c`` command, after the shell (run here, with ``pq`` a stub that echoes)."""
    c = container(workload)
    env = pod_env(workload, pod_name)
    argv = [kubelet_expand(a, env) for a in [*c.get("command", [ENTRYPOINT]), *c.get("args", [])]]
    if argv[0] == ENTRYPOINT:
        return argv[1:]
    assert argv[:2] == ["sh", "-c"], f"runs {argv[:2]}: expected pq or sh -c"
    stub = fake_bin / ENTRYPOINT
    if not stub.exists():
        stub.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
        stub.chmod(0o755)
    path = f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin"
    done = subprocess.run(
        ["/bin/sh", *argv[1:]], env={**env, "PATH": path}, capture_output=True, timeout=10
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().split("\0")[:-1]


def pq_args(workload: dict[str, Any], pod_name: str, fake_bin: Path) -> argparse.Namespace:
    """What ``pq`` in pod ``pod_name`` parses from its command line."""
    return parse_pq(pq_argv(workload, pod_name, fake_bin))


AUTOSCALING = K8S / "autoscaling"


def autoscaler(file: str) -> dict[str, Any]:
    """The one object of ``deploy/k8s/autoscaling/FILE``."""
    (found,) = load_yaml_documents(AUTOSCALING / file)
    assert isinstance(found, dict)
    return found


def autoscaling_queries() -> list[str]:
    """The PromQL of the KEDA ScaledObject's Prometheus triggers."""
    triggers = autoscaler("keda-scaledobject.yaml")["spec"]["triggers"]
    return [t["metadata"]["query"] for t in triggers if t["type"] == "prometheus"]


def autoscaling_metric_names() -> set[str]:
    """The metrics both autoscalers read (KEDA's queries, the HPA's external metrics)."""
    names = {m.group(0) for q in autoscaling_queries() for m in re.finditer(r"\bpq_\w+", q)}
    for metric in autoscaler("hpa.yaml")["spec"]["metrics"]:
        names.add(metric["external"]["metric"]["name"])
    return names
