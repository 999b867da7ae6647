"""The deployment files are valid and consistent with the server: the Dockerfile (hadolint and
its structure), docker-compose.yml (the compose spec and its services), the Prometheus config
and alert rules (promtool), the nginx config (`nginx -t`), the Grafana dashboard and the alerts
(every metric they query is one the server exports), the YAML style (yamllint) and the
Kubernetes manifests. Nothing is built or started except one gradserve server on loopback, to
read the metric names it exports.

The linters installed with the project's dev extras must be there; promtool and nginx come from
Debian packages (.ci/test installs them) and their tests skip, saying so, where they are absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradserve.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
PROMETHEUS_CONF = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gradserve.json"
K8S = DEPLOY / "k8s"
DOCS = ROOT / "docs" / "deployment.md"
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 120  # seconds for any one tool run

GRPC_PORT = 50051
METRICS_PORT = 9464
DEFAULTS = ServerConfig()  # what the deploy files' GRADSERVE_* variables override


# --- helpers ------------------------------------------------------------------------------


def assert_limits_agree(env: dict[str, str], kill_after: float) -> None:
    """With the server settings ``env`` gives (over the defaults), a call that starts computing
    just before SIGTERM can finish within the drain (its compute limit is under the grace
    period), and the drain ends before the orchestrator kills the process (``kill_after``)."""
    grace = float(env.get("GRADSERVE_GRACE_SECONDS", DEFAULTS.grace_seconds))
    compute = float(env.get("GRADSERVE_MAX_COMPUTE_SECONDS", DEFAULTS.max_compute_seconds))
    assert compute < grace < kill_after, (compute, grace, kill_after)


def find_tool(name: str) -> str | None:
    """The path of a command: the venv's own (next to this Python) first, then PATH."""
    own = VENV_BIN / name
    return str(own) if own.is_file() else shutil.which(name)


def tool(name: str, *, debian_package: str | None = None) -> str:
    """The path of a command. A tool from the dev extras must be there; a system tool from
    ``debian_package`` may be absent, and the test then skips, saying so."""
    found = find_tool(name)
    if found is not None:
        return found
    if debian_package is not None:
        pytest.skip(f"{name} is not installed (Debian package {debian_package})")
    pytest.fail(f"{name} is missing: install the dev extras (pip install -e '.[dev]')")


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its output as text."""
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def output(result: subprocess.CompletedProcess[str]) -> str:
    """A failed command's output, for an assertion message."""
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


# --- Dockerfile ---------------------------------------------------------------------------

Instruction = tuple[str, str]  # (INSTRUCTION in upper case, its arguments as written)


def dockerfile_instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile: comments dropped, continuation lines joined."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments (and parser directives) and blank lines, also inside a RUN
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends with a continuation line"
    return instructions


def dockerfile_stages() -> list[list[Instruction]]:
    """The build stages, each starting with its FROM."""
    stages: list[list[Instruction]] = []
    for instruction in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            stages.append([])
        assert stages, f"{instruction[0]} before the first FROM"
        stages[-1].append(instruction)
    return stages


def exec_form(args: str) -> list[str] | None:
    """The argument list of an exec-form (JSON array) instruction, None for shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def test_dockerfile_parser_reads_stages_and_continuations() -> None:
    text = ("# comment\nFROM a AS b\nRUN x \\\n    # inside\n    && y\n\nfrom c\n"
            'CMD ["serve"]\n')
    assert dockerfile_instructions(text) == [("FROM", "a AS b"), ("RUN", "x && y"),
                                             ("FROM", "c"), ("CMD", '["serve"]')]
    assert exec_form('["gradserve", "serve"]') == ["gradserve", "serve"]
    assert exec_form("gradserve serve") is None


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "warning", DOCKERFILE)
    assert result.returncode == 0, output(result)


def test_dockerfile_is_multi_stage_and_final_stage_copies_only_the_venv() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    bases = [args.split()[0] for (_, args), *_ in stages]
    for base in bases:  # pinned by tag, never latest
        assert ":" in base and not base.endswith(":latest"), base
    final = stages[-1]
    kinds = [kind for kind, _ in final]
    copies = [args for kind, args in final if kind in ("COPY", "ADD")]
    assert copies and all(args.startswith("--from=") for args in copies), copies
    assert "ADD" not in kinds
    runs = " ".join(args for kind, args in final if kind == "RUN")
    for banned in ("pip install", "apt-get install", "gcc", "build-essential"):
        assert banned not in runs, f"the final stage runs {banned!r}"


def test_dockerfile_final_stage_runs_as_non_root_user() -> None:
    users = [args for kind, args in dockerfile_stages()[-1] if kind == "USER"]
    assert users, "the final stage sets no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert user.isdigit(), "a numeric UID lets Kubernetes' runAsNonRoot check it"


def test_dockerfile_healthcheck_runs_gradserve_health() -> None:
    checks = [args for kind, args in dockerfile_stages()[-1] if kind == "HEALTHCHECK"]
    assert len(checks) == 1, checks
    options, _, command = checks[0].partition("CMD")
    argv = exec_form(command.strip())
    assert argv is not None, f"shell-form HEALTHCHECK: {command}"
    assert argv[:2] == ["gradserve", "health"], argv
    assert argv[argv.index("--target") + 1] == f"127.0.0.1:{GRPC_PORT}"
    assert "--timeout=" in options


def test_dockerfile_entrypoint_and_cmd_are_exec_form() -> None:
    final = dockerfile_stages()[-1]
    commands = {kind: args for kind, args in final if kind in ("ENTRYPOINT", "CMD")}
    assert commands, "no ENTRYPOINT or CMD"
    for kind, args in commands.items():
        assert exec_form(args) is not None, f"{kind} {args} is shell form: SIGTERM would go " \
            "to a shell, not to the server"
    argv = exec_form(commands.get("ENTRYPOINT", "[]")) or []
    argv += exec_form(commands.get("CMD", "[]")) or []
    assert argv == ["gradserve", "serve"], argv


def test_dockerfile_stop_signal_is_sigterm_and_ports_exposed() -> None:
    final = dockerfile_stages()[-1]
    signals = [args for kind, args in final if kind == "STOPSIGNAL"]
    assert signals in ([], ["SIGTERM"]), signals
    exposed = {int(p.split("/")[0]) for kind, args in final if kind == "EXPOSE"
               for p in args.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}
    env = " ".join(args for kind, args in final if kind == "ENV")
    assert "GRADSERVE_HOST=0.0.0.0" in env


def test_dockerignore_lets_in_what_the_builder_copies() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "the context should start from nothing"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    builder = dockerfile_stages()[0]
    sources = {src.rstrip("/") for kind, args in builder if kind == "COPY"
               for src in args.split()[:-1] if not src.startswith("--")}
    assert sources == allowed, (sources, allowed)
    for source in sources:
        assert (ROOT / source).exists(), source


# --- docker compose -----------------------------------------------------------------------


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(COMPOSE)["services"]
    return services


def published_ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(host port, container port) of each port a service publishes with a fixed host port."""
    ports: set[tuple[int, int]] = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            if "published" in entry:
                ports.add((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) >= 2:  # [host_ip:]host:container; a lone port gets a random host port
            ports.add((int(parts[-2]), int(parts[-1])))
    return ports


def mount_sources(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: target path -> source path relative to the repository."""
    mounts: dict[str, str] = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            source, target = entry.get("source", ""), entry["target"]
        else:
            source, target = str(entry).split(":")[:2]
        if source.startswith("."):
            mounts[target] = str(Path(source))
    return mounts


def test_published_ports_parses_compose_syntax() -> None:
    service = {"ports": ["8080:80", "127.0.0.1:9090:9090/tcp", "3000",
                         {"target": 443, "published": "8443"}, {"target": 53}]}
    assert published_ports(service) == {(8080, 80), (9090, 9090), (8443, 443)}


def test_compose_file_matches_compose_spec() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert result.returncode == 0, output(result)


def test_compose_gradserve_has_replicas_healthcheck_and_no_host_port() -> None:
    gradserve = compose_services()["gradserve"]
    assert gradserve["build"]["dockerfile"] == "Dockerfile"
    assert gradserve["deploy"]["replicas"] >= 2
    assert "ports" not in gradserve, "replicas cannot share a fixed host port"
    test = gradserve["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:3] == ["gradserve", "health"], test
    # Docker waits this long after SIGTERM before killing: more than the server's drain.
    assert_limits_agree(gradserve.get("environment", {}),
                        int(str(gradserve["stop_grace_period"]).rstrip("s")))


def test_compose_nginx_publishes_grpc_port() -> None:
    nginx = compose_services()["nginx"]
    assert (GRPC_PORT, GRPC_PORT) in published_ports(nginx)
    assert mount_sources(nginx)["/etc/nginx/nginx.conf"] == "deploy/nginx/nginx.conf"
    assert "gradserve" in nginx["depends_on"]


def test_compose_prometheus_and_grafana_mount_deploy_configs() -> None:
    services = compose_services()
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["image"].startswith("prom/prometheus:")
    assert grafana["image"].startswith("grafana/grafana:")
    assert mount_sources(prometheus)["/etc/prometheus/prometheus.yml"] == \
        "deploy/prometheus/prometheus.yml"
    grafana_mounts = mount_sources(grafana)
    assert grafana_mounts["/etc/grafana/provisioning"] == "deploy/grafana/provisioning"
    assert grafana_mounts["/etc/grafana/dashboards"] == "deploy/grafana/dashboards"
    assert {(9090, 9090)} == published_ports(prometheus)
    assert {(3000, 3000)} == published_ports(grafana)
    for service in services.values():  # every mounted file is in the repository
        for source in mount_sources(service).values():
            assert (ROOT / source).exists(), source


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    (source,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[
        "datasources"]
    assert (source["type"], source["url"], source["uid"]) == (
        "prometheus", "http://prometheus:9090", "prometheus")
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/gradserve.yml")[
        "providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"  # where compose mounts
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for t in dashboard_targets(dashboard)}
    assert uids == {"prometheus"}


# --- Prometheus ---------------------------------------------------------------------------


def test_prometheus_config_passes_promtool() -> None:
    promtool = tool("promtool", debian_package="prometheus")
    result = run(promtool, "check", "config", PROMETHEUS_CONF)
    assert result.returncode == 0, output(result)
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_every_replica_by_dns() -> None:
    config = load_yaml(PROMETHEUS_CONF)
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "gradserve"]
    (dns,) = job["dns_sd_configs"]
    assert (dns["names"], dns["type"], dns["port"]) == (["gradserve"], "A", METRICS_PORT)


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool = tool("promtool", debian_package="prometheus")
    result = run(promtool, "test", "rules", ALERT_TESTS, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, output(result)


# --- nginx --------------------------------------------------------------------------------


def nginx_version(nginx: str) -> tuple[int, ...]:
    result = run(nginx, "-v")
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", result.stderr + result.stdout)
    assert found, output(result)
    return tuple(int(n) for n in found.groups())


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected {old!r} once in {NGINX_CONF.name}"
    return text.replace(old, new)


def render_nginx_conf(text: str, version: tuple[int, ...]) -> str:
    """The compose config as this machine's nginx can test it: the upstream on 127.0.0.1
    (the `gradserve` name resolves only on the compose network, and an nginx without
    `resolve` looks it up while reading the config), and, for an nginx older than the image's,
    the older spelling of the two directives that changed."""
    server = "server gradserve:50051 resolve;"
    if version >= (1, 27, 3):  # `resolve`: names are looked up at run time, not now
        text = replace_once(text, server, "server 127.0.0.1:50051 resolve;")
    else:
        text = replace_once(text, server, "server 127.0.0.1:50051;")
    if version < (1, 25, 1):  # `http2 on;` came in 1.25.1; before, a listen parameter
        text = replace_once(text, "        http2 on;\n", "")
        text = replace_once(text, "listen 50051;", "listen 50051 http2;")
    return text


def test_render_nginx_conf_rewrites_only_for_older_nginx() -> None:
    text = "listen 50051;\n        http2 on;\nserver gradserve:50051 resolve;\n"
    assert render_nginx_conf(text, (1, 28, 0)) == \
        "listen 50051;\n        http2 on;\nserver 127.0.0.1:50051 resolve;\n"
    assert render_nginx_conf(text, (1, 22, 1)) == \
        "listen 50051 http2;\nserver 127.0.0.1:50051;\n"


def test_nginx_config_balances_grpc_over_the_replicas() -> None:
    text = NGINX_CONF.read_text()
    directives = {line.strip() for line in text.splitlines()
                  if line.strip() and not line.strip().startswith("#")}
    for expected in ("resolver 127.0.0.11 valid=5s ipv6=off;",
                     "upstream gradserve_backends {",
                     "zone gradserve_backends 64k;",
                     "server gradserve:50051 resolve;",
                     "least_conn;",  # per call: the client copes with per-replica ids
                     "listen 50051;",
                     "http2 on;",
                     "grpc_pass grpc://gradserve_backends;",
                     "grpc_next_upstream error timeout non_idempotent;",
                     "client_max_body_size 0;"):
        assert expected in directives, expected
    read_timeout = next(d for d in directives if d.startswith("grpc_read_timeout"))
    assert int(read_timeout.split()[1].rstrip("s;")) > 60  # the server's longest engine run


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = tool("nginx", debian_package="nginx-light")
    conf = tmp_path / "conf" / "nginx.conf"
    conf.parent.mkdir()
    conf.write_text(render_nginx_conf(NGINX_CONF.read_text(), nginx_version(nginx)))
    # -t only parses and checks (nothing listens); -p keeps relative paths in tmp_path and
    # -e stderr keeps the error log off the system's log directory.
    result = run(nginx, "-t", "-p", f"{tmp_path}/", "-c", conf, "-e", "stderr")
    assert result.returncode == 0, output(result)
    assert "test is successful" in result.stderr


# --- metric names -------------------------------------------------------------------------

# Series Prometheus makes itself for every target, not exported by the server.
SYNTHETIC_SERIES = {"up"}

# PromQL words that look like names: keywords and binary operators.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}
# Per family type, the suffixes its samples take (prometheus_client's exposition).
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
             "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "info": ("_info",),
             "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
             "unknown": ("",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values query) selects."""
    template = re.fullmatch(r"\s*label_values\((?:(.*),)?\s*\w+\s*\)\s*", expr, re.S)
    if template:
        expr = template.group(1) or ""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries: [5m], [$__rate_interval]
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def dashboard_targets(node: Any) -> Iterator[dict[str, Any]]:
    """Every query target of a Grafana dashboard, in panels and rows at any depth."""
    if isinstance(node, dict):
        if "expr" in node and "refId" in node:
            yield node
        for value in node.values():
            yield from dashboard_targets(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_targets(item)


def dashboard_expressions() -> dict[str, str]:
    """Where each dashboard query is (panel title / refId, or variable name) -> its text."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: dict[str, str] = {}
    for panel in dashboard["panels"]:
        for target in dashboard_targets(panel):
            exprs[f"dashboard panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            text = query["query"] if isinstance(query, dict) else query
            exprs[f"dashboard variable {variable['name']}"] = text
    return exprs


def alert_expressions() -> dict[str, str]:
    """Each alerting or recording rule of the rule files prometheus.yml loads -> its expr."""
    config = load_yaml(PROMETHEUS_CONF)
    exprs: dict[str, str] = {}
    for pattern in config.get("rule_files", []):
        for path in sorted(PROMETHEUS_CONF.parent.glob(pattern)):
            for group in load_yaml(path)["groups"]:
                for rule in group["rules"]:
                    name = rule.get("alert") or rule.get("record")
                    exprs[f"{path.name} rule {name}"] = rule["expr"]
    assert exprs, "prometheus.yml loads no rules"
    return exprs


def docs_expressions() -> dict[str, str]:
    """The PromQL blocks of docs/deployment.md (```promql fences)."""
    blocks = re.findall(r"```promql\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/deployment.md shows no PromQL"
    return {f"docs/deployment.md block {k}": block for k, block in enumerate(blocks)}


@pytest.fixture(scope="module")
def exported_metrics() -> set[str]:
    """Every sample name the server's metrics registry exports, as wired up in a real server
    (its live values, such as the queue depth, are registered when the server is built).
    Families with labels but no series yet still count, by their type's suffixes."""
    from gradserve.server.app import GradServer
    from gradserve.server.config import ServerConfig

    server = GradServer(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1))
    try:
        names: set[str] = set()
        for family in server.metrics.registry.collect():
            names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
            names |= {sample.name for sample in family.samples}
    finally:
        server.stop(grace=0.0)
    return names


def test_metric_names_finds_selected_series_only() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job", code!="OK"}'
            '[$__rate_interval]))) / on(instance) group_left b offset 5m and ignoring(x) '
            'c:rule > bool 1e3 unless absent(up{job="x"} == 1) or sum(d) without (e)')
    assert metric_names(expr) == {"a_bucket", "b", "c:rule", "up", "d"}
    assert metric_names("label_values(gradserve_queue_depth, job)") == {"gradserve_queue_depth"}
    assert metric_names("label_values(job)") == set()


def test_exported_metrics_cover_the_documented_names(exported_metrics: set[str]) -> None:
    """The names the deployment files were written against (docs/deployment.md lists them)."""
    expected = {
        "gradserve_requests_total", "gradserve_queue_depth", "gradserve_requests_in_flight",
        "gradserve_graph_cache_hits_total", "gradserve_graph_cache_misses_total",
        "gradserve_graph_cache_entries", "gradserve_received_bytes_total",
        "gradserve_sent_bytes_total", "gradserve_rejected_requests_total",
        "process_cpu_seconds_total", "process_resident_memory_bytes",
    } | {f"gradserve_{name}_{suffix}"
         for name in ("request_duration_seconds", "queue_wait_seconds",
                      "forward_duration_seconds", "backward_duration_seconds",
                      "batch_examples", "batch_requests")
         for suffix in ("bucket", "sum", "count")}
    assert expected - exported_metrics == set()


@pytest.mark.parametrize("source", ["dashboard", "alerts", "docs"])
def test_queries_use_only_exported_metrics(exported_metrics: set[str], source: str) -> None:
    exprs = {"dashboard": dashboard_expressions, "alerts": alert_expressions,
             "docs": docs_expressions}[source]()
    unknown: dict[str, set[str]] = {}
    for where, expr in exprs.items():
        names = metric_names(expr)
        assert names, f"{where} selects no metric: {expr}"
        missing = names - exported_metrics - SYNTHETIC_SERIES
        if missing:
            unknown[where] = missing
    assert not unknown, f"metrics the server does not export: {unknown}"


def test_dashboard_shows_the_required_panels() -> None:
    exprs = list(dashboard_expressions().values())
    joined = "\n".join(exprs)
    assert "rate(gradserve_requests_total" in joined  # requests per second
    assert re.search(r'gradserve_requests_total\{[^}]*code!="OK"', joined)  # error rate
    for quantile in ("0.5", "0.99"):  # aggregated over replicas by le
        assert re.search(rf"histogram_quantile\({quantile}, sum by \(le[^)]*\) \(rate\("
                         r"gradserve_request_duration_seconds_bucket", joined), quantile
    assert re.search(r"rate\(gradserve_batch_examples_sum[^/]*/\s*sum\(rate\("
                     r"gradserve_batch_examples_count", joined)
    assert "gradserve_queue_depth" in joined
    assert "gradserve_requests_in_flight" in joined


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard query, as a recording rule with Grafana's variables
    filled in."""
    promtool = tool("promtool", debian_package="prometheus")
    fill = {"$__rate_interval": "1m", "$__interval": "15s", "$job": "gradserve"}
    rules = []
    for k, query in enumerate(dashboard_expressions().values()):
        # A variable's label_values query: promtool parses its selector only.
        expr = metric_names(query).pop() if query.lstrip().startswith("label_values(") \
            else query
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{k}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", path)
    assert result.returncode == 0, output(result)


# --- YAML style ---------------------------------------------------------------------------


def test_yaml_files_pass_yamllint() -> None:
    files = [COMPOSE, ROOT / ".yamllint", *sorted(DEPLOY.rglob("*.yml")),
             *sorted(DEPLOY.rglob("*.yaml"))]
    assert len(files) >= 10
    result = run(tool("yamllint"), "--strict", "-c", ROOT / ".yamllint", *files)
    assert result.returncode == 0, output(result)


# --- Kubernetes ---------------------------------------------------------------------------


def manifest(name: str) -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert isinstance(document, dict)
    return document


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = manifest("deployment.yaml")["spec"]["template"]["metadata"][
        "labels"]
    return labels


def selects_pods(selector: dict[str, str]) -> bool:
    """Whether a label selector matches the Deployment's pods."""
    return bool(selector) and selector.items() <= pod_labels().items()


def test_k8s_manifests_parse_as_the_expected_kinds() -> None:
    kinds = {name: (m["apiVersion"], m["kind"]) for name in
             ("deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")
             for m in [manifest(name)]}
    assert kinds == {"deployment.yaml": ("apps/v1", "Deployment"),
                     "service.yaml": ("v1", "Service"),
                     "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
                     "pdb.yaml": ("policy/v1", "PodDisruptionBudget")}
    assert {p.name for p in K8S.iterdir()} == set(kinds)


def test_k8s_manifests_match_kubernetes_schemas() -> None:
    validate = find_tool("kubernetes-validate")
    if validate is None:  # not (yet) among the dev extras
        pytest.skip("kubernetes-validate is not installed (PyPI package kubernetes-validate)")
    # 1.27: the first release with gRPC probes on by default (GA).
    result = run(validate, "--strict", "-k", "1.27.0", *sorted(K8S.glob("*.yaml")))
    assert result.returncode == 0, output(result)


def test_k8s_deployment_probes_are_grpc_on_50051() -> None:
    (container,) = manifest("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT}, probe
        assert "httpGet" not in container[probe] and "exec" not in container[probe]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]


def test_k8s_deployment_runs_non_root_read_only() -> None:
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_k8s_deployment_outlasts_the_drain_and_is_scraped() -> None:
    deployment = manifest("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert_limits_agree(env, pod["terminationGracePeriodSeconds"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert selects_pods(deployment["spec"]["selector"]["matchLabels"])


def test_k8s_service_is_headless_and_selects_the_pods() -> None:
    spec = manifest("service.yaml")["spec"]
    assert spec["clusterIP"] == "None"
    assert selects_pods(spec["selector"])
    ports = {p["name"]: p["port"] for p in spec["ports"]}
    assert ports["grpc"] == GRPC_PORT


def test_k8s_hpa_scales_the_deployment_on_cpu() -> None:
    spec = manifest("hpa.yaml")["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1", "Deployment", manifest("deployment.yaml")["metadata"]["name"])
    assert spec["minReplicas"] >= 2
    assert spec["maxReplicas"] >= spec["minReplicas"]
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_k8s_pdb_selects_the_pods() -> None:
    spec = manifest("pdb.yaml")["spec"]
    assert spec["minAvailable"] >= 1
    assert selects_pods(spec["selector"]["matchLabels"])


def test_docs_show_how_to_run_each_way() -> None:
    text = DOCS.read_text()
    for expected in ("docker compose up", "--scale gradserve=", "kubectl apply -f deploy/k8s/",
                     "dns:///gradserve.default.svc.cluster.local:50051", "round_robin",
                     "--workers", "50051", "9090", "3000"):
        assert expected in text, expected
