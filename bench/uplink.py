#!/usr/bin/env python3
"""Uplink benchmark: edge nodes publishing up to a hub, edgewire beside NATS
leaf nodes, measured in the same run with the same client process
(edgewire-loadgen's `uplink` mode).

- edgewire: a hub agent on 127.0.0.20 with channel `up`, and an edge agent
  on each of 127.0.0.21.. with `up` uplinked to it (store-and-forward queue
  on disk);
- NATS: a hub nats-server on 127.0.0.20 (JetStream domain `hub`) and a leaf
  nats-server on each of 127.0.0.21.. (JetStream domain `edge<i>`, a leafnode
  remote to the hub). Each leaf's stream `UP` stores what its publisher
  sends; the hub's stream `UP` sources every leaf's stream (NATS's documented
  way to aggregate leaf streams at a hub, "JetStream on Leaf Nodes").

Phases, each on freshly started servers with empty state: throughput at
saturation, publish-to-hub latency at a fixed rate, and an outage (the hub
stopped while the edges go on publishing, then started again) with the drain
that follows; three rounds of each (one in quick mode), the systems taking
turns, each figure the median of its rounds. Prints tables with the ratios
edgewire/NATS and, on a full run,
writes them to bench/results/uplink.md. All traffic stays on loopback; every
wait is bounded; everything started is stopped and removed. Figures only:
nothing here passes or fails on a time."""

import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = os.environ["EDGEWIRE_LOADGEN"]
AGENT = os.environ["EDGEWIRE_AGENT"]
NATS = os.environ.get("EDGEWIRE_NATS_SERVER", "nats-server")
QUICK = os.environ.get("EDGEWIRE_BENCH_QUICK") == "1"

HUB = "127.0.0.20"
EDGES = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
SIZE = 256
THROUGHPUT_MESSAGES = 20_000 if QUICK else 100_000  # per edge
LATENCY_RATE = 500  # messages/s per edge
LATENCY_SECONDS = 5 if QUICK else 20
OUTAGE_RATE = 1000  # messages/s per edge
OUTAGE_BEFORE = 2 if QUICK else 5
OUTAGE_SECONDS = 10 if QUICK else 60
# Each figure is the median of its rounds: one round's tail latency moves
# with whatever else the machine did in those seconds.
ROUNDS = 1 if QUICK else 3
# The edges' queue bound: above anything a run stores, so nothing is dropped
# for room (the default is 64 MiB; NATS streams have no bound by default).
EDGE_QUEUE_BYTES = 256 * 1024 * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host, port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def stop(proc, timeout=15):
    """SIGTERM, then SIGKILL after `timeout`; a stopped (SIGSTOP) process is
    continued first so it can exit."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Deployment:
    """A hub and its edges, one system; the hub can be stopped and started
    again on the same state."""

    def __init__(self, tmp, name):
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
        self.hub = None
        self.edges = []
        self.logs = []

    def spawn(self, args, log):
        path = self.tmp / log
        self.logs.append(path)
        return subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(path, "a"))

    def __enter__(self):
        self.start_hub()
        self.edges = [self.start_edge(i) for i in range(len(EDGES))]
        return self

    def __exit__(self, *exc):
        for p in self.edges + ([self.hub] if self.hub else []):
            stop(p)

    def stop_hub(self):
        stop(self.hub)
        self.hub = None

    def pause_edges(self, paused):
        for p in self.edges:
            p.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def tail(self):
        """The end of each log, for a run that failed."""
        out = []
        for path in self.logs:
            lines = path.read_text(errors="replace").splitlines()[-5:]
            out += [f"    {path.name}: {line}" for line in lines]
        return "\n".join(out)


class Edgewire(Deployment):
    name = "edgewire"

    def __init__(self, tmp, port):
        super().__init__(tmp, "edgewire")
        self.port = port
        self.hub_url = f"ws://{HUB}:{port}/relay"
        self.edge_urls = [f"ws://{ip}:{port}/relay" for ip in EDGES]
        hub_config = self.tmp / "hub.yaml"
        # The hub's subscriber takes the drain in bursts: room for them.
        hub_config.write_text(
            f"services:\n  - name: hub\n    port: {port}\n    channels: [{{name: up}}]\n"
            "    limits: {sendQueueMessages: 65536, sendQueueBytes: 268435456}\n")
        self.hub_config = hub_config

    def start_hub(self):
        self.hub = self.spawn([AGENT, "--config", self.hub_config, "--listen-address", HUB,
                               "--admin-address", f"{HUB}:{free_port()}", "--node-name", "hub",
                               "--state-dir", self.tmp / "hub", "--log-level", "warn"], "hub.log")
        wait_port(HUB, self.port)

    def start_edge(self, i):
        config = self.tmp / f"edge{i}.yaml"
        config.write_text(
            f"services:\n  - name: edge\n    port: {self.port}\n    channels: [{{name: up, uplink: true}}]\n"
            f"    hub: {{url: \"{self.hub_url}\", queueBytes: {EDGE_QUEUE_BYTES}}}\n")
        p = self.spawn([AGENT, "--config", config, "--listen-address", EDGES[i],
                        "--admin-address", f"{EDGES[i]}:{free_port()}", "--node-name", f"edge{i}",
                        "--state-dir", self.tmp / f"edge{i}", "--log-level", "warn"], f"edge{i}.log")
        wait_port(EDGES[i], self.port)
        return p


class Nats(Deployment):
    name = "nats"

    def __init__(self, tmp, port):
        super().__init__(tmp, "nats")
        self.port = port
        self.leaf_port = free_port()
        self.hub_url = f"nats://{HUB}:{port}"
        self.edge_urls = [f"nats://{ip}:{port}" for ip in EDGES]

    def start_hub(self):
        conf = self.tmp / "hub.conf"
        conf.write_text(
            f'server_name: hub\nlisten: "{HUB}:{self.port}"\n'
            f'jetstream {{\n  store_dir: "{self.tmp / "hub"}"\n  domain: hub\n}}\n'
            f'leafnodes {{\n  listen: "{HUB}:{self.leaf_port}"\n}}\n')
        self.hub = self.spawn([NATS, "-c", conf], "hub.log")
        wait_port(HUB, self.port)

    def start_edge(self, i):
        conf = self.tmp / f"edge{i}.conf"
        conf.write_text(
            f'server_name: edge{i}\nlisten: "{EDGES[i]}:{self.port}"\n'
            f'jetstream {{\n  store_dir: "{self.tmp / f"edge{i}"}"\n  domain: edge{i}\n}}\n'
            f'leafnodes {{\n  remotes: [{{url: "nats-leaf://{HUB}:{self.leaf_port}"}}]\n}}\n')
        p = self.spawn([NATS, "-c", conf], f"edge{i}.log")
        wait_port(EDGES[i], self.port)
        return p


def run_phase(deployment, phase, extra):
    """One loadgen run against `deployment`, answering its outage steps;
    its JSON figures, or {"error": ...}."""
    args = [LOADGEN, "uplink", "--system", deployment.name, "--phase", phase, "--hub-url", deployment.hub_url,
            "--size", str(SIZE), *extra]
    for url in deployment.edge_urls:
        args += ["--edge-url", url]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = None
    try:
        for line in proc.stdout:
            message = json.loads(line)
            event = message.get("event")
            if event is None:
                result = message
                continue
            print(f"    {event}", flush=True)
            if event == "stop-hub":
                deployment.stop_hub()
            elif event == "start-hub":
                # The edges wait (SIGSTOP) until the hub's subscriber is
                # back: a relay hub delivers only to those subscribed, and
                # what comes up before would not be counted.
                deployment.pause_edges(True)
                deployment.start_hub()
            elif event == "resume-edges":
                deployment.pause_edges(False)
            proc.stdin.write("done\n")
            proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        deployment.pause_edges(False)
    if proc.returncode != 0 or result is None:
        err = proc.stderr.read().strip().splitlines()
        return {"error": err[-1] if err else f"exit {proc.returncode}"}
    return result


def measure(tmp, port):
    """Every phase, ROUNDS times, the two systems taking turns within each
    round (so a slow minute on the machine falls on both); for each system,
    phase -> the list of its rounds' figures."""
    results = {"edgewire": {}, "nats": {}}
    phases = [
        ("throughput", ["--messages", str(THROUGHPUT_MESSAGES)]),
        ("latency", ["--rate", str(LATENCY_RATE), "--seconds", str(LATENCY_SECONDS)]),
        ("outage", ["--rate", str(OUTAGE_RATE), "--before-seconds", str(OUTAGE_BEFORE),
                    "--outage-seconds", str(OUTAGE_SECONDS)]),
    ]
    for phase, extra in phases:
        for round_ in range(ROUNDS):
            for make in (Edgewire, Nats):
                deployment = make(tmp, port)
                print(f"== {deployment.name} {phase} (round {round_ + 1}/{ROUNDS})", flush=True)
                with deployment:
                    r = run_phase(deployment, phase, extra)
                    if "error" in r:
                        print(deployment.tail(), flush=True)
                shutil.rmtree(deployment.tmp, ignore_errors=True)
                results[deployment.name].setdefault(phase, []).append(r)
                print(f"  {phase}: {r}", flush=True)
    return results


def get(r, *path):
    for key in path:
        if not isinstance(r, dict):
            return None
        r = r.get(key)
    return r


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.2f}" if v < 10 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def ratio(a, b, lower_is_better, goal):
    if not a or not b:
        return "n/a", ""
    r = a / b
    if lower_is_better:
        verdict = "met" if goal is not None and r <= goal else ("not met" if goal is not None else "")
    else:
        verdict = "met" if goal is not None and r >= goal else ("not met" if goal is not None else "")
    return f"{r:.2f}", verdict


def figure(rounds_by_phase, pick):
    """The median over the rounds of what `pick` reads from one round's
    {phase: figures}; None when no round has it."""
    values = []
    for i in range(ROUNDS):
        one = {phase: rounds[i] for phase, rounds in rounds_by_phase.items() if i < len(rounds)}
        v = pick(one)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            values.append(v)
    return statistics.median(values) if values else None


def counts(rounds):
    """Every round's messages, summed; or the rounds' errors."""
    rounds = rounds or []
    errors = [get(r, "error") for r in rounds if not isinstance(r, dict) or "published" not in r]
    good = [r for r in rounds if isinstance(r, dict) and "published" in r]
    if not good:
        return "; ".join(str(e) for e in errors) or "n/a"
    total = {k: sum(r[k] for r in good) for k in ("delivered", "published", "lost", "duplicates", "reordered")}
    text = (f"{total['delivered']:,}/{total['published']:,} delivered, {total['lost']:,} lost, "
            f"{total['duplicates']:,} duplicated, {total['reordered']:,} reordered")
    return text + (f"; {len(errors)} round(s) failed: {'; '.join(str(e) for e in errors)}" if errors else "")


def version_of(*cmd):
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main():
    tmp = Path(tempfile.mkdtemp(prefix="edgewire-bench-uplink-", dir=os.environ.get("EDGEWIRE_BENCH_TMP")))
    load_before = os.getloadavg()
    try:
        runs = measure(tmp, free_port())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    rows = [
        ("steady-state uplink (messages/s)", lambda r: get(r, "throughput", "steady_per_second"), False, 1.0),
        ("publish-to-hub p50 (µs)", lambda r: get(r, "latency", "p50_us"), True, None),
        ("publish-to-hub p99 (µs)", lambda r: get(r, "latency", "p99_us"), True, 1.5),
        ("publish-to-hub p99.9 (µs)", lambda r: get(r, "latency", "p999_us"), True, None),
        ("drain after the outage, from the hub's return (messages/s)",
         lambda r: get(r, "outage", "outage", "drain_per_second"), False, 1.0),
        ("hub's return to the first message after it (s)",
         lambda r: get(r, "outage", "outage", "first_after_return_seconds"), True, None),
        ("drain from the first message after the return (messages/s)",
         lambda r: get(r, "outage", "outage", "drain_per_second_from_first"), False, None),
        ("backlog at the hub's return (messages)", lambda r: get(r, "outage", "outage", "backlog_at_return"), None, None),
        ("throughput phase: publish rate into the edges (messages/s)",
         lambda r: get(r, "throughput", "publish_per_second"), None, None),
    ]
    table = ["| figure | edgewire | NATS leaf nodes | edgewire/NATS | goal |", "| --- | --- | --- | --- | --- |"]
    for label, pick, lower, goal in rows:
        a, b = figure(runs["edgewire"], pick), figure(runs["nats"], pick)
        if lower is None:
            r, verdict = "", ""
        else:
            r, verdict = ratio(a, b, lower, goal)
        goal_text = "" if goal is None else (f"≥ {goal}" if not lower else f"≤ {goal}") + (f" ({verdict})" if verdict else "")
        table.append(f"| {label} | {fmt(a)} | {fmt(b)} | {r} | {goal_text} |")
    count_rows = ["| phase | edgewire | NATS leaf nodes |", "| --- | --- | --- |"]
    for phase in ("throughput", "latency", "outage"):
        count_rows.append(f"| {phase} | {counts(runs['edgewire'].get(phase))} | {counts(runs['nats'].get(phase))} |")

    machine = (
        f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
        f"{platform.system()} {platform.release()}"
    )
    edges = len(EDGES)
    report = "\n".join([
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine}{' (quick mode)' if QUICK else ''}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.",
        f"Versions: {version_of(AGENT, '--version')}; {version_of(NATS, '--version')}.",
        f"Command: `{'EDGEWIRE_BENCH_QUICK=1 ' if QUICK else ''}bench/uplink.sh`.",
        "",
        f"A hub on {HUB} and {edges} edge nodes on {', '.join(EDGES)}, one publisher per edge and one",
        "subscriber at the hub, all in one `edgewire-loadgen uplink` process (one clock for send and",
        f"arrival); {SIZE}-byte payloads. Each phase starts on fresh servers with empty state; each figure is "
        f"the median of {ROUNDS} round(s), the two systems taking turns within a round.",
        "",
        "- edgewire: the hub an agent with channel `up`; each edge an agent whose `up` is an `uplink` channel "
        "to it (`hub.url: ws://...`, queue bound 256 MiB). Publishers are relay clients of the edges, one publish "
        "per frame without an `id` (no reply); the subscriber a relay client of the hub in batch mode. On disk: "
        "each message written to the edge's queue log (one `write`) before the next is read, `fdatasync` every "
        "200 ms; the hub appends each delivered (node, sequence) to its table.",
        "- NATS: the hub a nats-server with JetStream (domain `hub`) and a leafnode listener; each edge a "
        "nats-server with JetStream (domain `edge<i>`) and a leafnode remote to the hub. Each leaf's stream `UP` "
        "(file storage) stores its publisher's subject `up.<i>`; the hub's stream `UP` (file storage) sources "
        "every leaf's stream through `$JS.edge<i>.API`, as NATS's \"JetStream on Leaf Nodes\" guide aggregates "
        "leaf streams. Publishers are async-nats clients of the leaves (plain publishes); the subscriber reads the "
        "hub's stream with an ordered push consumer. On disk: the file store's writes, flushed within milliseconds, "
        "its own background sync (nats-server 2.9 has no setting for it).",
        "",
        "| phase | how |",
        "| --- | --- |",
        f"| throughput | each publisher sends {THROUGHPUT_MESSAGES:,} messages as fast as its edge takes them; "
        "the hub's delivery rate between the 10th and the 90th percentile of arrivals |",
        f"| latency | {LATENCY_RATE} messages/s per edge ({LATENCY_RATE * edges:,}/s in all) for {LATENCY_SECONDS} s |",
        f"| outage | {OUTAGE_RATE} messages/s per edge; after {OUTAGE_BEFORE} s the hub is stopped (SIGTERM) for "
        f"{OUTAGE_SECONDS} s while publishing goes on, publishing stops, the hub starts again on its state; the edges "
        "are paused (SIGSTOP) from just before the hub starts until its subscriber is back, then the drain is timed "
        "from that moment until the last message arrives |",
        "",
        *table,
        "",
        f"Every message counted (per publisher and sequence; the {ROUNDS} round(s) summed):",
        "",
        *count_rows,
        "",
        "Raw figures (JSON):",
        "",
        "```json",
        json.dumps(runs, indent=1),
        "```",
    ])
    print("\n" + report)
    if QUICK:
        print("\n(quick mode: bench/results/uplink.md left as it was)")
    else:
        out = ROOT / "bench" / "results" / "uplink.md"
        out.write_text("# Uplink benchmark: edgewire beside NATS leaf nodes\n\n" + report + "\n")
        print(f"written to {out}")


if __name__ == "__main__":
    sys.exit(main())
