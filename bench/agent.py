#!/usr/bin/env python3
"""Agent benchmarks: edgewire beside the seed's Python websockets server, a
Node.js ws server and nats-server (WebSocket listener), measured in the same
run with the same client (edgewire-loadgen); then the mesh, three edgewire
agents beside a three-server NATS cluster and beside three agents of the
first round (the build the data path's goals are judged against), each in
turn, over several rounds, reported as medians. Prints tables with the ratio
edgewire/peer and writes them to bench/results/agent.md. All traffic stays
on loopback; every run is bounded in count and time. Figures only: nothing
here passes or fails on a time."""

import json
import os
import statistics
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LOADGEN = os.environ["EDGEWIRE_LOADGEN"]
AGENT = os.environ["EDGEWIRE_AGENT"]
SEED_PYTHON = os.environ["EDGEWIRE_SEED_PYTHON"]
QUICK = os.environ.get("EDGEWIRE_BENCH_QUICK") == "1"
# The first round's agent (bench/common.sh builds it), or "" to leave it out.
FIRST_ROUND_AGENT = os.environ.get("EDGEWIRE_FIRST_ROUND_AGENT", "")
FIRST_ROUND_COMMIT = os.environ.get("EDGEWIRE_FIRST_ROUND_COMMIT", "")[:7]
# "mesh" runs the mesh workloads alone (edgewire's cluster beside NATS's) and
# writes results/agent-mesh.md, leaving the full report as it was.
ONLY = os.environ.get("EDGEWIRE_BENCH_ONLY", "")
if ONLY not in ("", "mesh"):
    sys.exit(f"EDGEWIRE_BENCH_ONLY={ONLY!r}: the only choice is 'mesh'")

ECHO_CLIENTS = [100, 1000]
ECHO_MESSAGES = 20 if QUICK else 100
FANOUT_SUBSCRIBERS = 1000
FANOUT_MESSAGES = 20 if QUICK else 100
HANDSHAKES = 500 if QUICK else 3000
IDLE = [1000] if QUICK else [10000, 50000]
CPU_ROUND_TRIPS = 20_000 if QUICK else 100_000
MESH_LATENCY_MESSAGES = 1000 if QUICK else 5000
MESH_RATE = 1000
MESH_SUBSCRIBERS = 10
MESH_THROUGHPUT_MESSAGES = 10_000 if QUICK else 100_000
# One link offered a steady rate instead of a burst, for LINK_PACED_SECONDS
# at each: whether every message arrives with the subscriber never cut, the
# rate reached, and the servers' CPU per message. A burst measures how fast
# the publisher may push; these measure what a link sustains.
LINK_RATES = [50_000] if QUICK else [50_000, 100_000, 150_000, 200_000]
LINK_PACED_SECONDS = 0.5 if QUICK else 2
# A single mesh run swings by a factor of several on a shared 2-core
# machine; the clusters take turns, round after round, and the report
# gives each figure's median (and the one-link figures of every round).
MESH_ROUNDS = 1 if QUICK else int(os.environ.get("EDGEWIRE_BENCH_MESH_ROUNDS", "5"))
SOURCES = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"
# The mesh's nodes, each on its own loopback address.
MESH_NODES = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def loadgen(*args):
    out = subprocess.run([LOADGEN, *args], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        # anyhow's report, not the backtrace that may follow it.
        lines = out.stderr.strip().splitlines()
        reported = [line for line in lines if line.startswith("Error:")]
        return {"error": (reported or lines or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


class Server:
    """A server under test: how to start it and how the loadgen reaches it."""

    def __init__(self, name, echo_url, fan_url, dialect, start, batch_dialect=None):
        self.name, self.echo_url, self.fan_url, self.dialect, self.start_fn = name, echo_url, fan_url, dialect, start
        # A second fan-out run in this dialect (edgewire's batch mode).
        self.batch_dialect = batch_dialect
        self.proc = None

    def __enter__(self):
        self.proc = self.start_fn()
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def edgewire(tmp):
    port = free_port()
    admin = free_port()
    config = tmp / "agent.yaml"
    config.write_text(
        f"services:\n  - name: bench\n    port: {port}\n"
        "    handlers: [{name: echo, kind: echo, path: /}]\n"
        "    channels: [{name: fan}]\n"
        "    limits: {maxConnections: 100000}\n"
    )

    def start():
        p = subprocess.Popen(
            [AGENT, "--config", str(config), "--listen-address", "127.0.0.1", "--admin-address", f"127.0.0.1:{admin}", "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        return p

    return Server("edgewire", f"ws://127.0.0.1:{port}/", f"ws://127.0.0.1:{port}/relay", "relay", start,
                  batch_dialect="relay-batch")


def seed_python(tmp):
    def start():
        p = subprocess.Popen([SEED_PYTHON, str(BENCH / "peers/seed/ws_server.py")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(8765)
        return p

    return Server("python websockets (seed)", "ws://127.0.0.1:8765/", None, None, start)


def node_ws(tmp):
    port = free_port()

    def start():
        p = subprocess.Popen(["node", str(BENCH / "peers/node-ws/server.js"), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        return p

    return Server("node ws", f"ws://127.0.0.1:{port}/", f"ws://127.0.0.1:{port}/fan", "raw", start)


def nats(tmp):
    port = free_port()
    conf = tmp / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{free_port()}"\nmax_connections: 100000\n'
        f'websocket {{\n  listen: "127.0.0.1:{port}"\n  no_tls: true\n}}\n'
    )

    def start():
        p = subprocess.Popen(["nats-server", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        return p

    return Server("nats-server", f"ws://127.0.0.1:{port}/", f"ws://127.0.0.1:{port}/", "nats", start)


class Cluster:
    """Three servers, one per loopback address in MESH_NODES, linked as a
    mesh; clients reach node i at urls[i]."""

    def __init__(self, name, dialect, urls, start, batch_dialect=None):
        self.name, self.dialect, self.urls, self.start_fn = name, dialect, urls, start
        # A second one-link run with the subscriber in this dialect
        # (edgewire's batch mode).
        self.batch_dialect = batch_dialect
        self.procs = []

    def __enter__(self):
        self.procs = self.start_fn()
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    def cpu_seconds(self):
        """CPU used so far by the cluster's servers together, or None once
        one of them has exited (its figures are gone with it)."""
        if any(p.poll() is not None for p in self.procs):
            return None
        try:
            return sum(cpu_seconds(p.pid) for p in self.procs)
        except OSError:
            return None


def agent_mesh(tmp, name, agent, peer_fields, node_args, batch_dialect=None):
    """Three agents of `agent`, one per loopback address in MESH_NODES,
    peered with each other: `peer_fields(j)` adds to node j's entry in the
    others' peer lists, `node_args(i)` to node i's command line."""
    port, mesh_port = free_port(), free_port()

    def start():
        procs = []
        for i, ip in enumerate(MESH_NODES):
            peers = "\n".join(f"      - {{node: n{j}, address: \"{other}:{mesh_port}\"{peer_fields(j)}}}"
                              for j, other in enumerate(MESH_NODES) if j != i)
            config = tmp / f"{name}-{i}.yaml"
            config.write_text(
                f"services:\n  - name: bench\n    port: {port}\n"
                "    channels: [{name: mesh}]\n"
                "    limits: {maxConnections: 100000}\n"
                f"    peers:\n{peers}\n"
            )
            procs.append(subprocess.Popen(
                [agent, "--config", str(config), "--listen-address", ip, "--admin-address", f"{ip}:{free_port()}",
                 "--node-name", f"n{i}", "--mesh-address", f"{ip}:{mesh_port}", *node_args(i), "--log-level", "warn"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for ip in MESH_NODES:
            wait_port(port, host=ip)
        return procs

    return Cluster(name, "relay", [f"ws://{ip}:{port}/relay" for ip in MESH_NODES], start, batch_dialect=batch_dialect)


def edgewire_mesh(tmp):
    # Each node's mesh key, and its public half for the others' configs.
    keys = [tmp / f"mesh-{i}.key" for i in range(len(MESH_NODES))]
    public = [subprocess.run([AGENT, "--mesh-key-file", str(k), "--print-mesh-public-key"],
                             check=True, capture_output=True, text=True).stdout.strip() for k in keys]
    return agent_mesh(tmp, "edgewire", AGENT, lambda j: f", publicKey: {public[j]}",
                      lambda i: ["--mesh-key-file", str(keys[i])], batch_dialect="relay-batch")


def first_round_mesh(tmp):
    """Three agents of the first round, configured as that round's agent
    was: a shared mesh secret, no per-node keys."""
    secret = tmp / "first-round-mesh-secret"
    secret.write_text("edgewire bench mesh secret")
    return agent_mesh(tmp, f"edgewire-{FIRST_ROUND_COMMIT}", FIRST_ROUND_AGENT, lambda j: "",
                      lambda i: ["--mesh-secret-file", str(secret)])


def completed(result):
    """Whether a workload's run went to its end: no error, and no
    subscriber cut off by the server (a slow consumer)."""
    return "error" not in result and not result.get("subscribers_cut")


def median_run(runs):
    """One run's shape from several: each workload's numeric figures as
    their median over the runs that completed, delivered as the least; a
    workload no run completed says why the first one did not."""
    out = {}
    for key in dict.fromkeys(k for r in runs for k in r):
        tried = [r[key] for r in runs if key in r]
        done = [d for d in tried if completed(d)]
        if not done:
            why = tried[0].get("error") or tried[0].get("cut_because")
            out[key] = {"runs": 0, "failed_runs": len(tried), "why": why}
            continue
        figures = {}
        for field in dict.fromkeys(f for d in done for f in d):
            values = [d[field] for d in done if isinstance(d.get(field), (int, float))]
            if not values:
                continue
            if field == "delivered":
                figures[field] = min(values)
            elif all(isinstance(v, int) for v in values):
                # A count stays a count: of two rounds, the lower one.
                figures[field] = statistics.median_low(values)
            else:
                figures[field] = statistics.median(values)
        figures["runs"] = len(done)
        figures["failed_runs"] = len(tried) - len(done)
        out[key] = figures
    return out


def nats_cluster(tmp):
    client_port, route_port, ws_port = free_port(), free_port(), free_port()

    def start():
        procs = []
        for i, ip in enumerate(MESH_NODES):
            routes = ", ".join(f"nats-route://{other}:{route_port}" for other in MESH_NODES if other != ip)
            conf = tmp / f"nats-{i}.conf"
            conf.write_text(
                f'server_name: n{i}\nlisten: "{ip}:{client_port}"\nmax_connections: 100000\n'
                f'cluster {{\n  name: bench\n  listen: "{ip}:{route_port}"\n  routes: [{routes}]\n}}\n'
                f'websocket {{\n  listen: "{ip}:{ws_port}"\n  no_tls: true\n}}\n'
            )
            procs.append(subprocess.Popen(["nats-server", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for ip in MESH_NODES:
            wait_port(ws_port, host=ip)
        return procs

    return Cluster("nats-server cluster", "nats", [f"ws://{ip}:{ws_port}/" for ip in MESH_NODES], start)


def measure_mesh(cluster):
    """Each mesh workload on a fresh cluster: latency from node 0 to
    subscribers on the two other nodes, the same on node 0 alone (the local
    path, for reference), and throughput across one link, under a burst
    and at each steady rate of LINK_RATES."""
    runs = {
        "latency_mesh": (cluster.urls[1:], MESH_SUBSCRIBERS, MESH_LATENCY_MESSAGES, MESH_RATE),
        "latency_local": (cluster.urls[:1], MESH_SUBSCRIBERS, MESH_LATENCY_MESSAGES, MESH_RATE),
        "throughput_link": (cluster.urls[1:2], 1, MESH_THROUGHPUT_MESSAGES, 0),
    }
    for rate in LINK_RATES:
        runs[f"link_paced{rate}"] = (cluster.urls[1:2], 1, int(rate * LINK_PACED_SECONDS), rate)
    if cluster.batch_dialect:
        runs["throughput_link_batch"] = runs["throughput_link"]
    results = {}
    for key, (subscribe, subscribers, messages, rate) in runs.items():
        dialect = cluster.batch_dialect if key.endswith("_batch") else cluster.dialect
        with cluster:
            args = ["mesh", "--publish-url", cluster.urls[0], "--dialect", dialect, "--source", SOURCES,
                    "--subscribers", str(subscribers), "--messages", str(messages), "--rate", str(rate)]
            for url in subscribe:
                args += ["--subscribe-url", url]
            # The window includes the run's connections and warm-up (a few
            # hundred milliseconds of small messages): the same for each
            # cluster. A run cut short has no figure per message.
            before = cluster.cpu_seconds()
            results[key] = loadgen(*args)
            after = cluster.cpu_seconds()
            if None not in (before, after) and completed(results[key]) and results[key].get("delivered"):
                per_100k = (after - before) / results[key]["delivered"] * 100_000
                results[key]["servers_cpu_seconds_per_100k"] = per_100k
        print(f"  {key}: {results[key]}", flush=True)
    return results


def measure(server):
    """Every workload against one server, each on a fresh process."""
    results = {}
    echo_dialect = "nats" if server.dialect == "nats" else "raw"
    for clients in ECHO_CLIENTS:
        with server:
            r = loadgen("echo", "--url", server.echo_url, "--dialect", echo_dialect, "--source", SOURCES,
                        "--clients", str(clients), "--messages", str(ECHO_MESSAGES))
        results[f"echo{clients}"] = r
        print(f"  echo {clients} clients: {r}", flush=True)
    if server.fan_url:
        with server:
            r = loadgen("fanout", "--url", server.fan_url, "--dialect", server.dialect, "--source", SOURCES,
                        "--subscribers", str(FANOUT_SUBSCRIBERS), "--messages", str(FANOUT_MESSAGES))
        results["fanout"] = r
        print(f"  fan-out: {r}", flush=True)
    if server.fan_url and server.batch_dialect:
        with server:
            r = loadgen("fanout", "--url", server.fan_url, "--dialect", server.batch_dialect, "--source", SOURCES,
                        "--subscribers", str(FANOUT_SUBSCRIBERS), "--messages", str(FANOUT_MESSAGES))
        results["fanout_batch"] = r
        print(f"  fan-out, batch mode: {r}", flush=True)
    with server:
        r = loadgen("handshakes", "--url", server.echo_url, "--dialect", echo_dialect, "--source", SOURCES,
                    "--count", str(HANDSHAKES), "--concurrency", "50")
    results["handshakes"] = r
    print(f"  handshakes: {r}", flush=True)
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for n in IDLE:
        if n + 1000 > fd_limit:
            results[f"idle{n}"] = {"skipped": f"needs {n} open files per process; the limit here is {fd_limit}"}
            print(f"  idle {n}: skipped, open files limit {fd_limit}", flush=True)
            continue
        with server:
            time.sleep(0.5)
            before = rss_kib(server.proc.pid)
            p = subprocess.Popen([LOADGEN, "idle", "--url", server.echo_url, "--dialect", echo_dialect, "--source", SOURCES,
                                  "--connections", str(n), "--hold", "3", "--timeout", "300"], stdout=subprocess.PIPE, text=True)
            line = p.stdout.readline()
            time.sleep(1.0)
            after = rss_kib(server.proc.pid)
            p.wait(timeout=330)
            opened = json.loads(line) if line.strip() else {}
        per_conn = (after - before) * 1024 / n if opened.get("open") == n else None
        results[f"idle{n}"] = {"bytes_per_connection": per_conn, "rss_before_kib": before, "rss_after_kib": after}
        print(f"  idle {n}: {results[f'idle{n}']}", flush=True)
    with server:
        clients = 100
        before = cpu_seconds(server.proc.pid)
        r = loadgen("echo", "--url", server.echo_url, "--dialect", echo_dialect, "--source", SOURCES,
                    "--clients", str(clients), "--messages", str(CPU_ROUND_TRIPS // clients))
        used = cpu_seconds(server.proc.pid) - before
    trips = r.get("round_trips") or 0
    results["cpu"] = {"cpu_seconds_per_100k": used / trips * 100_000 if trips else None}
    print(f"  cpu: {results['cpu']}", flush=True)
    return results


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        return "not run: " + v["skipped"]
    if isinstance(v, float):
        v = round(v, 3) if v < 10 else round(v)
    return f"{v}{unit}"


def idle_figure(r):
    """Bytes per connection, or the reason the size was not run."""
    return r if "skipped" in r else r.get("bytes_per_connection")


def rounds_done(r):
    if "runs" not in r:
        return None
    return f"{r['runs']} of {r['runs'] + r['failed_runs']}"


def delivered(r):
    if "delivered" not in r:
        return None
    return f"{r['delivered']}/{r['expected']}"


def ratio(a, b, lower_is_better):
    if lower_is_better is None or isinstance(a, dict) or isinstance(b, dict):
        return ""
    if a in (None, 0) or b in (None, 0):
        return "n/a"
    r = a / b
    verdict = ("better" if r < 1 else "worse") if lower_is_better else ("better" if r > 1 else "worse")
    return f"{r:.2f} ({verdict})"


def short(peer):
    """A peer's name in a ratio column: its first word."""
    return peer.split()[0]


def stopped_short(result):
    """Why a run did not go to its end, for a table's cell; None if it did
    (see `completed`)."""
    if result.get("subscribers_cut"):
        return f"its subscriber cut after {result.get('delivered')} of {result.get('expected')}"
    if "error" in result:
        return "failed"
    return None


def per_round(rounds, peers):
    """The one-link figures of every round: edgewire's messages/s and p50,
    and their ratios to each peer in the same round."""
    link = lambda r: r.get("throughput_link", {})
    lines = [
        "| round | edgewire messages/s | " + "".join(f"edgewire/{short(p)} | " for p in peers)
        + "edgewire p50 (µs) |" + "".join(f" edgewire/{short(p)} |" for p in peers),
        "|" + " --- |" * (3 + 2 * len(peers)),
    ]
    def against(ours, theirs, field, lower):
        # A peer's run that did not go to its end has no rate to compare.
        return stopped_short(theirs) or ratio(ours.get(field), theirs.get(field), lower)

    for i, r in enumerate(rounds, 1):
        ours = link(r["edgewire"])
        tput = [against(ours, link(r[p]), "deliveries_per_second", False) for p in peers]
        p50 = [against(ours, link(r[p]), "p50_us", True) for p in peers]
        lines.append(f"| {i} | {fmt(ours.get('deliveries_per_second'))} | " + " | ".join(tput)
                     + f" | {fmt(ours.get('p50_us'))} | " + " | ".join(p50) + " |")
    return lines


def paced_rows(rate):
    """The report's rows for one link offered `rate` messages/s."""
    run = lambda r: r.get(f"link_paced{rate}", {})
    offered = f"one link offered {rate} messages/s for {LINK_PACED_SECONDS} s"
    return [
        (f"{offered}: rounds run to the end (no error, no subscriber cut)", lambda r: rounds_done(run(r)), None),
        (f"{offered}: messages/s reached", lambda r: run(r).get("deliveries_per_second"), False),
        # At a rate every server keeps, the latency is compared at equal
        # throughput; under a burst it is the backlog over the drain rate.
        (f"{offered}: p50 publish to delivery (µs)", lambda r: run(r).get("p50_us"), True),
        (f"{offered}: the three servers' CPU per 100k messages (s)",
         lambda r: run(r).get("servers_cpu_seconds_per_100k"), True),
    ]


def paced_rounds(rounds, names):
    """One link at each offered rate, round by round: the rate each cluster
    reached, or where its run stopped short."""
    def cell(r):
        return stopped_short(r) or fmt(r.get("deliveries_per_second"))

    lines = ["| round | offered (messages/s) | " + " | ".join(names) + " |", "|" + " --- |" * (2 + len(names))]
    for i, r in enumerate(rounds, 1):
        for rate in LINK_RATES:
            cells = [cell(r[n].get(f"link_paced{rate}", {})) for n in names]
            lines.append(f"| {i} | {rate} | " + " | ".join(cells) + " |")
    return lines


def table(rows, ours, peers, results):
    """A markdown table: a row per workload, edgewire then each peer with the
    ratio edgewire/peer."""
    header = "| workload | edgewire | " + " | ".join(f"{p} | edgewire/{short(p)}" for p in peers) + " |"
    lines = [header, "|" + " --- |" * (2 + 2 * len(peers))]
    for label, get, lower in rows:
        cells = [label, fmt(get(ours))]
        for p in peers:
            cells += [fmt(get(results[p])), ratio(get(ours), get(results[p]), lower)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def version_of(*cmd):
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main():
    tmp = Path(tempfile.mkdtemp(prefix="edgewire-bench-"))
    servers = [edgewire(tmp), seed_python(tmp), node_ws(tmp), nats(tmp)]
    single = {}
    for server in servers if ONLY != "mesh" else []:
        print(f"== {server.name}", flush=True)
        single[server.name] = measure(server)
    clusters = [edgewire_mesh(tmp), nats_cluster(tmp)]
    if FIRST_ROUND_AGENT:
        clusters.append(first_round_mesh(tmp))
    rounds = []
    for n in range(1, MESH_ROUNDS + 1):
        rounds.append({})
        for cluster in clusters:
            print(f"== mesh, round {n} of {MESH_ROUNDS}: {cluster.name}", flush=True)
            rounds[-1][cluster.name] = measure_mesh(cluster)
    meshes = {c.name: median_run([r[c.name] for r in rounds]) for c in clusters}
    shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("echo p50, 100 clients (µs)", lambda r: r.get("echo100", {}).get("p50_us"), True),
        ("echo p99, 100 clients (µs)", lambda r: r.get("echo100", {}).get("p99_us"), True),
        ("echo p99.9, 100 clients (µs)", lambda r: r.get("echo100", {}).get("p999_us"), True),
        ("echo p50, 1000 clients (µs)", lambda r: r.get("echo1000", {}).get("p50_us"), True),
        ("echo p99, 1000 clients (µs)", lambda r: r.get("echo1000", {}).get("p99_us"), True),
        ("echo p99.9, 1000 clients (µs)", lambda r: r.get("echo1000", {}).get("p999_us"), True),
        (f"fan-out to {FANOUT_SUBSCRIBERS} subscribers (deliveries/s)", lambda r: r.get("fanout", {}).get("deliveries_per_second"), False),
        # Peers have no batch mode of their own: nats-server already packs
        # pending messages per frame; their figure is their one fan-out run.
        (f"fan-out to {FANOUT_SUBSCRIBERS} subscribers, edgewire in batch mode (deliveries/s)",
         lambda r: (r.get("fanout_batch") or r.get("fanout", {})).get("deliveries_per_second"), False),
        ("handshakes/s", lambda r: r.get("handshakes", {}).get("per_second"), False),
    ] + [
        (f"memory per idle connection at {n} (bytes)", (lambda n: lambda r: idle_figure(r.get(f"idle{n}", {})))(n), True)
        for n in IDLE
    ] + [
        ("CPU per 100k echo round trips (s)", lambda r: r.get("cpu", {}).get("cpu_seconds_per_100k"), True),
    ]
    mesh_rows = [
        (f"mesh: p50 publish to delivery, 1 → {2 * MESH_SUBSCRIBERS} subscribers on 2 other nodes (µs)", lambda r: r.get("latency_mesh", {}).get("p50_us"), True),
        ("mesh: p99 (µs)", lambda r: r.get("latency_mesh", {}).get("p99_us"), True),
        ("mesh: p99.9 (µs)", lambda r: r.get("latency_mesh", {}).get("p999_us"), True),
        ("mesh: delivered of expected", lambda r: delivered(r.get("latency_mesh", {})), None),
        (f"local: p50, {MESH_SUBSCRIBERS} subscribers on the publisher's node (µs)", lambda r: r.get("latency_local", {}).get("p50_us"), True),
        ("local: p99 (µs)", lambda r: r.get("latency_local", {}).get("p99_us"), True),
        ("one link: messages/s, publisher → 1 subscriber on another node", lambda r: r.get("throughput_link", {}).get("deliveries_per_second"), False),
        ("one link: delivered of expected", lambda r: delivered(r.get("throughput_link", {})), None),
        ("one link: rounds run to the end (no error, no subscriber cut)", lambda r: rounds_done(r.get("throughput_link", {})), None),
        ("one link: p50 publish to delivery under that load (µs)", lambda r: r.get("throughput_link", {}).get("p50_us"), True),
        # nats-server packs the messages pending for a subscriber into one
        # frame by itself; its figures are its one run above.
        ("one link, edgewire's subscriber in batch mode: messages/s",
         lambda r: (r.get("throughput_link_batch") or r.get("throughput_link", {})).get("deliveries_per_second"), False),
        ("one link, edgewire's subscriber in batch mode: p50 (µs)",
         lambda r: (r.get("throughput_link_batch") or r.get("throughput_link", {})).get("p50_us"), True),
    ]
    for rate in LINK_RATES:
        mesh_rows += paced_rows(rate)
    machine = (
        f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
        f"{platform.system()} {platform.release()}"
    )
    seed_v = version_of(SEED_PYTHON, "-c", "import websockets,sys;print('websockets', websockets.__version__, 'python', sys.version.split()[0])")
    header = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine}{' (quick mode)' if QUICK else ''}.",
        f"Versions: {version_of(AGENT, '--version')}; {seed_v}; node {version_of('node', '--version')} with ws 8.18.3; "
        f"{version_of('nats-server', '--version')}.",
        f"Command: `{'EDGEWIRE_BENCH_ONLY=mesh ' if ONLY else ''}bench/agent.sh`. Ratios are edgewire/peer; `better`/`worse` say which way they lean.",
        "",
    ]
    one_server = [] if ONLY == "mesh" else [
        "### One server",
        "",
        *table(rows, single["edgewire"], [s.name for s in servers[1:]], single),
        "",
    ]
    peers = [c.name for c in clusters[1:]]
    first_round = (
        f"`{clusters[2].name}` is the first round's agent, built from that commit with today's toolchain and driven by "
        "today's load generator: the build the data path's goals are judged against."
        if FIRST_ROUND_AGENT else
        "The first round's agent was left out (see the run's log: this checkout's history lacks its commit)."
    )
    report = "\n".join(header + one_server + [
        f"### Mesh of three nodes ({', '.join(MESH_NODES)}), {MESH_RATE} messages/s for latency",
        "",
        f"Medians of {MESH_ROUNDS} rounds; in each round every cluster ran every workload in turn. {first_round}",
        "",
        *table(mesh_rows, meshes["edgewire"], peers, meshes),
        "",
        "One link under an unpaced burst, round by round (ratios are edgewire/peer in the same round):",
        "",
        *per_round(rounds, peers),
        "",
        "One link offered a steady rate, round by round (the rate reached):",
        "",
        *paced_rounds(rounds, [c.name for c in clusters]),
        "",
        "Raw figures (JSON; `mesh` holds the medians, `mesh_rounds` every round):",
        "",
        "```json",
        json.dumps({"single": single, "mesh": meshes, "mesh_rounds": rounds}, indent=1),
        "```",
    ])
    out = BENCH / "results" / ("agent-mesh.md" if ONLY == "mesh" else "agent.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text(report + "\n")
    print()
    print(report)


if __name__ == "__main__":
    sys.exit(main())
