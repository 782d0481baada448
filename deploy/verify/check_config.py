#!/usr/bin/env python3
"""Static checks of deploy/: every YAML/JSON file parses, and the Dockerfile, the
Kubernetes manifests, compose.yaml, Prometheus and Grafana files agree with each other
and with postern's documented contract (env vars, ports, metric names).

    check_config.py REPO_ROOT              run the checks, exit 1 on any error
    check_config.py --print-env REPO_ROOT  print the Deployment's POSTERN_* env as K=V
"""
import glob
import json
import os
import re
import sys

import yaml

# postern's metrics contract; a dashboard or alert using anything else is a typo.
METRICS = {
    "postern_connections_total", "postern_connections_active",
    "postern_tls_handshakes_total", "postern_auth_attempts_total",
    "postern_backend_connections_total", "postern_bytes_total",
    "postern_session_duration_seconds", "postern_backend_up", "postern_reloads_total",
    "postern_certificate_expiry_timestamp_seconds",
    # relay-out
    "postern_upstream_sessions_total", "postern_oauth2_token_refreshes_total",
    "postern_oauth2_token_expiry_timestamp_seconds",
}
HISTOGRAMS = {"postern_session_duration_seconds"}
IMAGE_ENTRYPOINT = "/usr/local/bin/postern"

errors, warnings = [], []


def error(msg):
    errors.append(msg)


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def deployment_container(deploy_dir):
    for doc in load_yaml_docs(os.path.join(deploy_dir, "kubernetes", "deployment.yaml")):
        if doc.get("kind") == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["name"] == "postern":
                    return doc, c
    sys.exit("deploy/kubernetes/deployment.yaml: no Deployment with a 'postern' container")


def env_map(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def main(argv):
    if len(argv) == 3 and argv[1] == "--print-env":
        _, c = deployment_container(os.path.join(argv[2], "deploy"))
        for k, v in env_map(c).items():
            print(f"{k}={v}")
        return 0
    if len(argv) != 2:
        sys.exit(__doc__)
    root = argv[1]
    deploy = os.path.join(root, "deploy")
    rel = lambda p: os.path.relpath(p, root)

    # 1. Everything parses.
    parsed = {}
    for path in sorted(glob.glob(f"{deploy}/**/*.y*ml", recursive=True)):
        try:
            parsed[rel(path)] = load_yaml_docs(path)
        except yaml.YAMLError as e:
            error(f"{rel(path)}: {e}")
    for path in sorted(glob.glob(f"{deploy}/**/*.json", recursive=True)):
        try:
            with open(path) as f:
                parsed[rel(path)] = [json.load(f)]
        except ValueError as e:
            error(f"{rel(path)}: {e}")
    if errors:
        return report(parsed)

    # 2. Dockerfile essentials.
    with open(os.path.join(deploy, "Dockerfile")) as f:
        dockerfile = f.read()
    final = dockerfile[dockerfile.rfind("\nFROM "):]
    expose = {int(p) for line in re.findall(r"^EXPOSE\s+(.*)$", final, re.M) for p in line.split()}
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    if not user or user[-1].split(":")[0] in ("0", "root"):
        error("deploy/Dockerfile: the final stage must set a non-root USER")
    if f'ENTRYPOINT ["{IMAGE_ENTRYPOINT}"]' not in final or 'CMD ["serve"]' not in final:
        error(f'deploy/Dockerfile: expected ENTRYPOINT ["{IMAGE_ENTRYPOINT}"] and CMD ["serve"]')
    if "--locked" not in dockerfile:
        error("deploy/Dockerfile: cargo build must use --locked")

    # 3. Kubernetes manifests.
    dep, pc = deployment_container(deploy)
    pod = dep["spec"]["template"]["spec"]
    k8s_env = env_map(pc)
    ports = {p["name"]: p["containerPort"] for p in pc.get("ports", [])}
    if set(ports.values()) != expose:
        error(f"containerPorts {sorted(ports.values())} != Dockerfile EXPOSE {sorted(expose)}")
    metrics_port = int(k8s_env.get("POSTERN_METRICS_LISTEN", ":0").rsplit(":", 1)[1])
    if ports.get("metrics") != metrics_port:
        error(f"metrics containerPort {ports.get('metrics')} != POSTERN_METRICS_LISTEN port {metrics_port}")
    for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        probe = pc.get(kind, {}).get("httpGet", {})
        if probe.get("path") != path or probe.get("port") not in ("metrics", metrics_port):
            error(f"postern {kind} must GET {path} on the metrics port, got {probe}")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(metrics_port):
        error("pod annotations prometheus.io/scrape|port don't match the metrics port")
    sc = pc.get("securityContext", {})
    for key, want in (("runAsNonRoot", True), ("readOnlyRootFilesystem", True),
                      ("allowPrivilegeEscalation", False)):
        if sc.get(key) is not want:
            error(f"postern securityContext.{key} should be {want}")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        error("postern securityContext.capabilities.drop should be [ALL]")
    if not pc.get("resources", {}).get("limits") or not pc.get("resources", {}).get("requests"):
        error("postern needs resource requests and limits")
    sysctls = {s["name"]: s["value"] for s in pod.get("securityContext", {}).get("sysctls", [])}
    low_ports = [p for p in expose if p < 1024]
    if low_ports and int(sysctls.get("net.ipv4.ip_unprivileged_port_start", 1024)) > min(low_ports):
        error(f"non-root postern binds {low_ports} but the pod doesn't lower "
              "net.ipv4.ip_unprivileged_port_start")
    for m in pc.get("volumeMounts", []):
        if "subPath" in m:
            error(f"postern volumeMount {m['name']} uses subPath: Secret updates would never arrive")
    mounts = [m["mountPath"] for m in pc.get("volumeMounts", [])]
    for var in ("POSTERN_CERT", "POSTERN_KEY", "POSTERN_USERS"):
        if var in k8s_env and not any(k8s_env[var].startswith(m.rstrip("/") + "/") for m in mounts):
            error(f"{var}={k8s_env[var]} is not under any volumeMount of the postern container")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= 30:
        error(f"terminationGracePeriodSeconds {grace} must exceed postern's 30s --shutdown-grace")

    for name, docs in parsed.items():
        if not name.startswith("deploy/kubernetes/"):
            continue
        for doc in docs:
            if doc.get("kind") == "Service":
                for p in doc["spec"]["ports"]:
                    if p["targetPort"] not in ports and p["targetPort"] not in ports.values():
                        error(f"{name}: Service {doc['metadata']['name']} targetPort {p['targetPort']} "
                              "is not a postern container port")
            if doc.get("kind") == "NetworkPolicy":
                allowed = {p["port"] for rule in doc["spec"].get("ingress", []) for p in rule.get("ports", [])}
                if allowed != set(ports.values()):
                    error(f"{name}: NetworkPolicy admits {sorted(allowed)}, postern serves {sorted(ports.values())}")
            if doc.get("kind") == "Kustomization":
                for r in doc.get("resources", []):
                    if not os.path.exists(os.path.join(deploy, "kubernetes", r)):
                        error(f"{name}: resource {r} does not exist")

    # 4. compose.yaml uses the same image and the same POSTERN_* variables.
    compose = parsed["deploy/compose.yaml"][0]
    cs = compose["services"]["postern"]
    if cs.get("image") != pc["image"]:
        error(f"image: compose {cs.get('image')!r} != Deployment {pc['image']!r}")
    compose_env = cs.get("environment", {})
    if isinstance(compose_env, list):
        compose_env = dict(e.split("=", 1) for e in compose_env)
    only_k8s = sorted(set(k8s_env) - set(compose_env))
    only_compose = sorted(set(compose_env) - set(k8s_env))
    if only_k8s or only_compose:
        error(f"env names differ: only in Deployment {only_k8s}, only in compose {only_compose}")
    compose_sysctls = cs.get("sysctls", {})
    if isinstance(compose_sysctls, list):
        compose_sysctls = dict(e.split("=", 1) for e in compose_sysctls)
    if str(compose_sysctls.get("net.ipv4.ip_unprivileged_port_start", "1024")).strip() != "0" and low_ports:
        error("compose postern must set sysctl net.ipv4.ip_unprivileged_port_start=0 like the pod")
    for spec in cs.get("ports", []):
        inside = int(str(spec).rsplit(":", 1)[1].split("/")[0])
        if inside not in expose:
            error(f"compose publishes container port {inside}, not EXPOSEd by the image")
    backend = compose_env.get("POSTERN_BACKEND", "")
    if backend.split(":")[0] not in compose["services"]:
        error(f"compose POSTERN_BACKEND {backend} is not a compose service")
    prom = parsed["deploy/prometheus/prometheus.yml"][0]
    targets = [t for sc_ in prom["scrape_configs"] for s in sc_.get("static_configs", []) for t in s["targets"]]
    if f"postern:{metrics_port}" not in targets:
        error(f"prometheus.yml doesn't scrape postern:{metrics_port} ({targets})")

    # 5. POSTERN_* names the binary knows (src/config.rs, when present).
    config_rs = os.path.join(root, "src", "config.rs")
    if os.path.exists(config_rs):
        with open(config_rs) as f:
            known = set(re.findall(r'env\s*=\s*"(POSTERN_[A-Z_]+)"', f.read()))
        for var in sorted(set(k8s_env) - known):
            warnings.append(f"{var} is not (yet) read by src/config.rs")

    # 6. Metric names in the dashboard and the alerts are postern's.
    allowed = set(METRICS) | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    exprs = []
    dash = parsed["deploy/grafana/postern-dashboard.json"][0]
    for panel in dash.get("panels", []):
        if panel.get("type") == "row":
            continue
        if not panel.get("targets"):
            error(f"dashboard panel {panel.get('title')!r} has no queries")
        exprs += [("dashboard", t["expr"]) for t in panel.get("targets", [])]
    for group in parsed["deploy/prometheus/postern-alerts.yaml"][0]["groups"]:
        exprs += [("alerts", r["expr"]) for r in group["rules"]]
    used = set()
    for where, expr in exprs:
        for name in re.findall(r"\b(postern_[a-z0-9_]+)", expr):
            used.add(name)
            if name not in allowed:
                error(f"{where}: unknown metric {name} in {expr!r}")
    for name in sorted(METRICS - {n.rsplit('_bucket', 1)[0] for n in used} - used):
        if not any(u.startswith(name) for u in used):
            error(f"dashboard/alerts never use {name}")

    return report(parsed)


def report(parsed):
    for w in warnings:
        print(f"verify: warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"verify: error: {e}", file=sys.stderr)
    if errors:
        return 1
    print(f"verify: static checks OK ({len(parsed)} YAML/JSON files)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
