#!/usr/bin/env python3
"""Wasm handler benchmark: the example `add` component under `wasmtime serve`
and under edgewire (a `wasm` handler), with edgewire's native `add` as the
floor, measured in the same run with the same client (edgewire-loadgen's
HTTP mode, 100 keep-alive clients). Also the time from a new module digest
appearing in the config to its first answer (the compile of a new module),
and the same for an image module pushed to a loopback registry (pull and
compile).
Prints tables with ratios and writes them to bench/results/wasm.md. All
traffic stays on loopback; every run is bounded in count and time. Figures
only: nothing here passes or fails on a time."""

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = os.environ["EDGEWIRE_LOADGEN"]
AGENT = os.environ["EDGEWIRE_AGENT"]
WASMTIME = os.environ["EDGEWIRE_WASMTIME"]
COMPONENT = Path(os.environ["EDGEWIRE_ADD_COMPONENT"])
# The test registry and oras (testenv/build.sh), for image modules.
TESTENV_BIN = os.environ.get("EDGEWIRE_TESTENV_BIN")
QUICK = os.environ.get("EDGEWIRE_BENCH_QUICK") == "1"

CLIENTS = 100
REQUESTS = 50 if QUICK else 300
ROUNDS = 1 if QUICK else 3
COLD_STARTS = 2 if QUICK else 5
WARMUP_REQUESTS = 10  # per client, before each measured run
QUERY = "/add?a=1&b=2"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def loadgen(url):
    out = subprocess.run(
        [LOADGEN, "http", "--url", url, "--clients", str(CLIENTS), "--requests", str(REQUESTS),
         "--expect", "result", "--timeout", "300"],
        capture_output=True, text=True, timeout=330)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def http_get(port, path, timeout=1.0):
    """The status of one GET, or None when nothing answers yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64).decode(errors="replace")
            return int(head.split()[1]) if head.startswith("HTTP/") else None
    except (OSError, ValueError, IndexError):
        return None


class Process:
    def __init__(self, args, log):
        self.args, self.log = args, log

    def __enter__(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def agent_config(port, handlers):
    lines = ["services:", "  - name: bench", f"    port: {port}", "    handlers:"]
    for name, path, module in handlers:
        if module is None:
            lines.append(f"      - {{name: {name}, kind: add, path: {path}}}")
        else:
            # As many instances as clients: with the default cap (16) the 17th
            # concurrent request waits for a free instance (503 past its
            # deadline), and the benchmark would measure that queue.
            lines.append(f"      - {{name: {name}, kind: wasm, path: {path}, module: {{file: {module}}}, "
                         f"limits: {{maxInstances: {CLIENTS + 28}}}}}")
    return "\n".join(lines) + "\n"


def with_custom_section(wasm: bytes, tag: str) -> bytes:
    """The same component with one more custom section: a new digest, the
    same code (a component may carry custom sections at its top level)."""
    def leb(n):
        out = bytearray()
        while True:
            byte = n & 0x7F
            n >>= 7
            if n:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                return bytes(out)
    name = b"edgewire-bench"
    payload = leb(len(name)) + name + tag.encode()
    return wasm + b"\x00" + leb(len(payload)) + payload


def first_answer(port, path, config, text):
    """Writes `text` as the agent's config and times until `path` answers
    200: one sample, or none when it does not within 60 s."""
    written = time.monotonic()
    config.write_text(text)
    deadline = written + 60
    while time.monotonic() < deadline:
        if http_get(port, f"{path}?a=1&b=2") == 200:
            return [time.monotonic() - written]
        time.sleep(0.005)
    return []


def cold_starts(tmp):
    """Time from a config naming a module of a new digest to its first 200,
    with the agent reloading its config every 0.1 s (so the reload check
    adds at most that)."""
    port = free_port()
    config = tmp / "cold.yaml"
    state = tmp / "cold-state"
    config.write_text(agent_config(port, [("native", "/native", None)]))
    base = COMPONENT.read_bytes()
    samples = []
    with Process([AGENT, "--config", str(config), "--state-dir", str(state), "--reload-interval", "0.1",
                  "--log-level", "warn"], tmp / "cold.log"):
        wait_port(port)
        for i in range(COLD_STARTS):
            module = tmp / f"add-{i}.wasm"
            module.write_bytes(with_custom_section(base, f"{time.time_ns()}-{i}"))
            path = f"/add{i}"
            samples += first_answer(port, path, config,
                                    agent_config(port, [("native", "/native", None), (f"add{i}", path, module)]))
    return samples


def pulled_cold_starts(tmp):
    """Time from a config naming an image of a new digest (pushed with oras
    to a registry on loopback) to its first 200: resolve, pull, compile."""
    bin_dir = Path(TESTENV_BIN)
    registry_port, port = free_port(), free_port()
    registry_config = tmp / "registry.yml"
    registry_config.write_text(
        f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp}/registry\n"
        f"http:\n  addr: 127.0.0.1:{registry_port}\n")
    config = tmp / "pull.yaml"
    config.write_text(agent_config(port, [("native", "/native", None)]))
    base = COMPONENT.read_bytes()
    samples = []
    with Process([bin_dir / "registry", "serve", str(registry_config)], tmp / "registry.log"), \
            Process([AGENT, "--config", str(config), "--state-dir", str(tmp / "pull-state"),
                     "--reload-interval", "0.1", "--log-level", "warn"], tmp / "pull.log"):
        wait_port(registry_port)
        wait_port(port)
        for i in range(COLD_STARTS):
            (tmp / "add.wasm").write_bytes(with_custom_section(base, f"pull-{time.time_ns()}-{i}"))
            reference = f"127.0.0.1:{registry_port}/bench/add:v{i}"
            subprocess.run([bin_dir / "oras", "push", "--plain-http", reference, "add.wasm:application/wasm"],
                           cwd=tmp, check=True, capture_output=True, timeout=60,
                           env={**os.environ, "HOME": str(tmp), "DOCKER_CONFIG": str(tmp / "oras")})
            path = f"/pull{i}"
            lines = agent_config(port, [("native", "/native", None)])
            lines += (f"      - {{name: pull{i}, kind: wasm, path: {path}, "
                      f"module: {{image: \"{reference}\", plainHttp: true}}}}\n")
            samples += first_answer(port, path, config, lines)
    return samples


def main():
    tmp = Path(tempfile.mkdtemp(prefix="edgewire-bench-wasm-"))
    try:
        wasm_port, agent_port = free_port(), free_port()
        config = tmp / "agent.yaml"
        config.write_text(agent_config(agent_port, [("add", "/add", COMPONENT), ("native", "/native", None)]))
        serve = [WASMTIME, "serve", "-S", "cli", "--addr", f"127.0.0.1:{wasm_port}", str(COMPONENT)]
        agent = [AGENT, "--config", str(config), "--state-dir", str(tmp / "state"), "--log-level", "warn"]
        targets = {
            "wasmtime serve": (serve, wasm_port, QUERY),
            "edgewire wasm": (agent, agent_port, QUERY),
            "edgewire native": (agent, agent_port, "/native?a=1&b=2"),
        }
        runs = {name: [] for name in targets}
        for round_ in range(ROUNDS):
            # A different order each round, so neither side always runs first.
            names = list(targets)[round_ % 3:] + list(targets)[:round_ % 3]
            for name in names:
                args, port, path = targets[name]
                with Process(args, tmp / f"{name.replace(' ', '-')}.log"):
                    wait_port(port)
                    # Unmeasured warm-up at the measured concurrency, so each
                    # server has run as many requests at once as it is then
                    # measured with (a pooling allocator's slots are mapped
                    # for a module at their first use); a new module's cold
                    # start is measured on its own below.
                    loadgen_warm = subprocess.run(
                        [LOADGEN, "http", "--url", f"http://127.0.0.1:{port}{path}", "--clients", str(CLIENTS),
                         "--requests", str(WARMUP_REQUESTS), "--expect", "result", "--timeout", "60"],
                        capture_output=True, text=True, timeout=90)
                    if loadgen_warm.returncode != 0:
                        print(f"  {name}: warm-up failed: {loadgen_warm.stderr.strip()}", flush=True)
                    r = loadgen(f"http://127.0.0.1:{port}{path}")
                print(f"  round {round_ + 1}, {name}: {r}", flush=True)
                runs[name].append(r)
        cold = cold_starts(tmp)
        print(f"  cold starts (s): {cold}", flush=True)
        pulled = pulled_cold_starts(tmp) if TESTENV_BIN else []
        print(f"  cold starts pulling from a registry (s): {pulled}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def median(name, key):
        values = [r[key] for r in runs[name] if key in r]
        return statistics.median(values) if values else None

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "n/a"

    rows = []
    for name in targets:
        errors = [r["error"] for r in runs[name] if "error" in r]
        rows.append(f"| {name} | {fmt(median(name, 'per_second'))} | {fmt(median(name, 'p50_us'))} | "
                    f"{fmt(median(name, 'p99_us'))} | {len(runs[name]) - len(errors)}/{len(runs[name])} |")
    ours, peer, floor = "edgewire wasm", "wasmtime serve", "edgewire native"
    machine = (
        f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
        f"{platform.system()} {platform.release()}"
    )
    version = lambda *cmd: subprocess.run(list(cmd), capture_output=True, text=True, timeout=30).stdout.strip()
    report = "\n".join([
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine}{' (quick mode)' if QUICK else ''}.",
        f"Versions: {version(AGENT, '--version')}; {version(WASMTIME, '--version')}.",
        f"Command: `bench/wasm.sh`. {CLIENTS} keep-alive clients × {REQUESTS} requests of `GET {QUERY}`, "
        f"median of {ROUNDS} round(s), each server freshly started per run and warmed with "
        f"{CLIENTS} clients × {WARMUP_REQUESTS} requests first.",
        "",
        "| server | requests/s | p50 (µs) | p99 (µs) | runs without error |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        "| ratio | value | goal |",
        "| --- | --- | --- |",
        f"| throughput, edgewire wasm / wasmtime serve | {ratio(median(ours, 'per_second'), median(peer, 'per_second'))} | ≥ 1.0 |",
        f"| p99, edgewire wasm / edgewire native | {ratio(median(ours, 'p99_us'), median(floor, 'p99_us'))} | ≤ 2.0 |",
        f"| p99, edgewire wasm / wasmtime serve | {ratio(median(ours, 'p99_us'), median(peer, 'p99_us'))} | |",
        "",
        f"New module digest in the config to its first answer (compile and load, module from a file; "
        f"{len(cold)} samples, seconds): "
        + (f"median {statistics.median(cold):.3f}, max {max(cold):.3f}" if cold else "none answered"),
        "",
        f"New image digest in the config to its first answer (resolve, pull from a registry on loopback, "
        f"compile and load; {len(pulled)} samples, seconds): "
        + (f"median {statistics.median(pulled):.3f}, max {max(pulled):.3f}" if pulled else "none answered"),
        "",
    ])
    print("\n" + report)
    out = ROOT / "bench" / "results" / "wasm.md"
    out.write_text("# Wasm handler benchmark\n\n" + report)
    print(f"written to {out}")


def fmt(v):
    if v is None:
        return "n/a"
    return f"{v:,.0f}"


if __name__ == "__main__":
    main()
