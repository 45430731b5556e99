"""Online prediction under load: p50, p95 and p99 latency, images/s and the mean batch fill of
`python -m trainer.serving` at 1, 4, 16 and 64 concurrent clients, against the ceiling measured
in the same run.

The model is a mobile classifier (`mobile-versatile-1`, MobileNetV3-Large, untrained: weights do
not change the speed) written as a serving package; the images are 64 distinct generated JPEGs
at the model's input size. Each client is a coroutine of one asyncio loop in this process (httpx,
a keep-alive connection each) sending one image a request (TF Serving's route; AutoML's with
`--route automl`; the bodies encoded beforehand), the next once it has its answer, until the
level's `--requests` are sent. The ceiling is the same network and preprocessing in this
process on the cores' threads (the GPU where there is one): batches of `--max-batch-size` of
the same JPEGs, each decoded and transformed as the server does, measured for
`--ceiling-seconds` before and after each level with the server idle (the speed of a shared
VM drifts: each row's ceiling is the mean of the two around it).

On a shared machine other processes steal the cores, and a worker's two torch threads on two
cores then slow down several times over (each parallel region waits for the descheduled one):
each row waits (`--quiet-wait`, 120 s at most) until other processes keep under `--quiet`
(0.25) cores busy, and is measured again (`--retries`, 2) when they kept more busy during it;
`others` is the cores they kept busy (its ceilings included), `tries` the measurements made.

The first table is at `--size` (224x224: the network dominates); the second at a small size
(`--small-size`, 32x32, images and network), where what is left is the per-request overhead.
`mean batch` is images per batch (the harmonic mean of the answers' `x-batch-size`), `fill`
that over `--max-batch-size`. The CPU columns are CPU seconds per image: of this process (the
clients) and of the server's processes (main, manager, inference worker, HTTP). A last run of
`--memory-requests` (2,000) at 16 clients samples the resident memory of the server's whole
process tree (the sum of each process's RSS) every 5 %; it has stopped growing when its second
half grew by under 2 %. The server is then stopped with SIGTERM: it must exit 0 and leave no
process behind.

Targets on this CPU: images/s at 16 clients >= 0.7 of the ceiling; p99 at one client <= 2x its
p50; no error over the 2,000 requests, and memory that stops growing. On a GPU the same script
gives the figures to record, with the GPU's utilization during the 16-client run (nvidia-smi).

    .venv/bin/python benchmarks/serving.py [--requests 1000] [--clients 1,4,16,64] \
        [--max-batch-size 16] [--batch-timeout-ms 10] [--workers 1] [--size 224] \
        [--small-size 32] [--memory-requests 2000] [--route automl] [--skip-small] [--skip-memory]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TASK, LABELS = "image_classification", [f"label_{n}" for n in range(10)]
MIB = 1024 * 1024


# -- the model, its package and the images -------------------------------------------------------


def write_model(folder: Path, model_type: str, size: int) -> tuple[Path, Any]:
    """A serving package of an untrained ``model_type`` at ``size`` px; the package, settings."""
    import torch

    from trainer.serving.package import write_package
    from trainer.settings import Settings, composed
    from trainer.store.resources import new_id
    from trainer.stored_model import TrainedModel
    from trainer.tasks import task_of

    overrides = [f"model.input_size=[{size},{size}]", "model.pretrained=false"]
    settings = Settings.parse(composed(TASK, model_type, overrides))
    network = task_of(settings).network(settings, LABELS, pretrained=None)
    checkpoint = folder / f"untrained_{size}.ckpt"
    state = {"backbone." + key: value for key, value in network.state_dict().items()}
    torch.save({"state_dict": state}, checkpoint)
    model_id = new_id(settings.task.id_prefix)
    model = {
        "name": f"projects/local/locations/local/models/{model_id}",
        "displayName": f"serving_benchmark_{size}",
        "datasetId": "",
        "createTime": "2024-01-01T00:00:00.000000Z",
        "updateTime": "2024-01-01T00:00:00.000000Z",
        "deploymentState": "DEPLOYED",
    }
    trained = TrainedModel(model, settings, LABELS, checkpoint)
    return write_package(trained, folder / f"package_{size}"), settings


def jpegs(size: int, count: int, seed: int = 1) -> list[bytes]:
    """``count`` distinct JPEGs, ``size`` px square: noise under a few filled shapes."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw

    generator, rng = random.Random(seed), np.random.default_rng(seed)
    found = []
    for _ in range(count):
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = generator.randrange(size), generator.randrange(size)
            r = generator.randrange(2, max(3, size // 3))
            color = tuple(generator.randrange(256) for _ in range(3))
            shape = draw.ellipse if generator.random() < 0.5 else draw.rectangle
            shape([x - r, y - r, x + r, y + r], fill=color)
        with io.BytesIO() as out:
            image.save(out, "JPEG", quality=90)
            found.append(out.getvalue())
    return found


def request_bodies(images: list[bytes], route: str) -> list[bytes]:
    encoded = [base64.b64encode(image).decode("ascii") for image in images]
    if route == "automl":
        return [
            json.dumps({"payload": {"image": {"imageBytes": text}},
                        "params": {"score_threshold": "0.5"}}).encode()
            for text in encoded
        ]  # fmt: skip
    return [
        json.dumps({"instances": [{"image_bytes": {"b64": text}, "key": str(n)}]}).encode()
        for n, text in enumerate(encoded)
    ]


# -- the ceiling: the same network and preprocessing in this process -----------------------------


class Ceiling:
    """The package's network and preprocessing in this process, on the cores' threads (the GPU
    where there is one)."""

    def __init__(self, package: Path, images: list[bytes], batch: int) -> None:
        import torch

        from trainer.serving.package import read_package
        from trainer.stored_model import load_network
        from trainer.tasks import task_of

        torch.set_num_threads(os.cpu_count() or 1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        trained = read_package(package)
        network = load_network(trained).to(self.device)
        self.online = task_of(trained.settings).online(network, trained.settings, trained.labels)
        self.images, self.batch = images, batch
        self.one_batch(0)

    def one_batch(self, start: int, batch: int = 0) -> None:
        import torch

        from trainer.data.prediction import rgb_image

        pixels = []
        for n in range(start, start + (batch or self.batch)):
            with io.BytesIO(self.images[n % len(self.images)]) as handle:
                pixels.append(self.online.transform(rgb_image(handle, "image")))
        with torch.inference_mode():
            self.online.outputs(torch.stack(pixels).to(self.device))  # ends in .cpu(): synced

    def measure(self, seconds: float, batch: int = 0) -> float:
        """Images/s of decoding, transforming and running batches of ``batch`` (the maximum
        by default) of the images (cycled) for about ``seconds`` (two batches at least)."""
        batch = batch or self.batch
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or done < 2 * batch:
            self.one_batch(done, batch)
            done += batch
        return done / (time.perf_counter() - started)


# -- the server ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    children: list[Any] = field(default_factory=list)  # psutil.Process, once loaded

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tree(self) -> list[Any]:
        import psutil

        return [psutil.Process(self.process.pid), *self.children]

    def roles(self) -> dict[int, str]:
        """Each process's part: main, manager, worker, http, tracker."""
        main = self.tree()[0]
        named, spawned = {main.pid: "main"}, []
        for child in self.children:
            try:
                line = " ".join(child.cmdline())
            except Exception:
                continue
            if "resource_tracker" in line:
                named[child.pid] = "tracker"
            elif "spawn_main" in line:
                spawned.append(child)
            else:
                named[child.pid] = "http"  # forked: the main process's command line
        spawned.sort(key=lambda p: p.create_time())
        for number, child in enumerate(spawned):  # the manager starts before the workers
            named[child.pid] = "manager" if number == 0 else "worker"
        return named

    def rss(self) -> dict[int, int]:
        import psutil

        found = {}
        for process in self.tree():
            with contextlib.suppress(psutil.Error):
                found[process.pid] = process.memory_info().rss
        return found

    def pss(self) -> int:
        """The tree's proportional set size: pages shared between its processes (the HTTP
        processes are forks of the main one) counted once."""
        import psutil

        found = 0
        for process in self.tree():
            with contextlib.suppress(psutil.Error):
                found += process.memory_full_info().pss
        return found

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far, per role."""
        roles, found = self.roles(), {}
        for process in self.tree():
            try:
                times = process.cpu_times()
            except Exception:
                continue
            role = roles.get(process.pid, "other")
            found[role] = found.get(role, 0.0) + times.user + times.system
        return found


def start_server(package: Path, home: Path, args: argparse.Namespace, ready_s: float) -> Server:
    import httpx
    import psutil

    port = free_port()
    log = home / f"server_{port}.log"
    command = [
        sys.executable, "-m", "trainer.serving", str(package), "--port", str(port),
        "--workers", str(args.workers), "--max-batch-size", str(args.max_batch_size),
        "--batch-timeout-ms", str(args.batch_timeout_ms),
        "--request-timeout-seconds", str(args.request_timeout_seconds),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(PYTHONPATH=str(REPO), VISION_TRAINER_HOME=str(home),
               MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}")  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    server = Server(process, port, log)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                server.children = psutil.Process(process.pid).children(recursive=True)
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise SystemExit(f"the server did not answer /health within {ready_s:g} s")


def stop_server(server: Server) -> str:
    """SIGTERM to the main process; how it went."""
    import psutil

    started = time.perf_counter()
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        return "did not exit within 60 s of SIGTERM: killed"
    seconds = time.perf_counter() - started
    time.sleep(0.5)
    left = []
    for child in server.children:  # psutil.Process: a reused pid is not taken for the child
        with contextlib.suppress(psutil.Error):
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                left.append(child)
                child.kill()
    return (f"exit {code} {seconds:.1f} s after SIGTERM, "
            f"{len(left)} of its {len(server.children)} child processes left behind")  # fmt: skip


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Level:
    clients: int
    latencies: list[float] = field(default_factory=list)  # seconds, answered 200
    batches: list[int] = field(default_factory=list)  # x-batch-size of each 200
    errors: dict[str, int] = field(default_factory=dict)  # status or exception -> count
    seconds: float = 0.0
    client_cpu: float = 0.0
    server_cpu: dict[str, float] = field(default_factory=dict)
    gpu: str = ""
    ceiling: float = 0.0  # images/s
    others: float = 0.0  # cores busy with other processes than the server's and this one
    attempts: int = 1

    @property
    def sent(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000

    @property
    def images_per_s(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def mean_batch(self) -> float:  # images per batch: each batch's images answer its size
        return len(self.batches) / sum(1 / b for b in self.batches) if self.batches else 0.0


async def load(url: str, bodies: list[bytes], clients: int, requests: int, seconds: float,
               on_progress: Any = None) -> Level:  # fmt: skip
    """``clients`` coroutines sending ``requests`` bodies in all (cycled), for at most
    ``seconds``; each client waits for its answer before it sends again."""
    import httpx

    level = Level(clients)
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def one_client() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                body, sent = bodies[sent % len(bodies)], sent + 1
                began = time.perf_counter()
                try:
                    answer = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError as error:
                    key = type(error).__name__
                    level.errors[key] = level.errors.get(key, 0) + 1
                    continue
                took = time.perf_counter() - began
                if answer.status_code == 200:
                    level.latencies.append(took)
                    level.batches.append(int(answer.headers.get("x-batch-size", "0")) or 1)
                else:
                    key = f"{answer.status_code} {answer.text[:120]}"
                    level.errors[key] = level.errors.get(key, 0) + 1
                if on_progress is not None:
                    on_progress(level.sent)

        await asyncio.gather(*(one_client() for _ in range(clients)))
        level.seconds = time.perf_counter() - started
    return level


def measured(server: Server, url: str, bodies: list[bytes], clients: int, requests: int,
             seconds: float, on_progress: Any = None, gpu: bool = False) -> Level:  # fmt: skip
    """One level, with the CPU seconds of this process and of the server's processes."""
    sampler = GpuSampler() if gpu else None
    before_server, before_client = server.cpu(), time.process_time()
    span = Others(server)
    level = asyncio.run(load(url, bodies, clients, requests, seconds, on_progress))
    level.others = span.cores()
    level.client_cpu = time.process_time() - before_client
    after = server.cpu()
    level.server_cpu = {role: after[role] - before_server.get(role, 0.0) for role in after}
    if sampler is not None:
        level.gpu = sampler.stop()
    return level


class Others:
    """The cores that processes other than the server's and this one keep busy, from now on."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.started, self.ours, self.all = time.perf_counter(), self._ours(), self._all()

    def cores(self) -> float:
        everything, ours = self._all() - self.all, self._ours() - self.ours
        return max(0.0, everything - ours) / (time.perf_counter() - self.started)

    def _ours(self) -> float:
        return time.process_time() + sum(self.server.cpu().values())

    @staticmethod
    def _all() -> float:
        import psutil

        busy = ("user", "nice", "system", "irq", "softirq")
        return sum(getattr(psutil.cpu_times(), name, 0.0) for name in busy)


def wait_quiet(server: Server, cores: float, at_most: float) -> float:
    """Wait until other processes keep under ``cores`` busy over a second (``at_most`` s at
    most); the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < at_most:
        span = Others(server)
        time.sleep(1.0)
        if span.cores() < cores:
            break
    return time.perf_counter() - started


class GpuSampler:
    """nvidia-smi's utilization every half second, in a thread."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits"]  # fmt: skip
        while self.running:
            try:
                line = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                util, memory = (float(v) for v in line.splitlines()[0].split(","))
                self.samples.append((util, memory))
            except Exception:
                pass
            time.sleep(0.5)

    def stop(self) -> str:
        self.running = False
        self.thread.join()
        if not self.samples:
            return "no nvidia-smi samples"
        utils = [u for u, _ in self.samples]
        memory = max(m for _, m in self.samples)
        return (f"GPU utilization mean {statistics.mean(utils):.0f} %, max {max(utils):.0f} % "
                f"({len(utils)} samples), memory up to {memory:.0f} MiB")  # fmt: skip


# -- a table per size ----------------------------------------------------------------------------


def table(title: str, rows: list[Level], max_batch: int) -> None:
    print(f"\n{title}")
    heads = ["clients", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "p99/p50", "images/s",
             "ceiling", "ratio", "mean batch", "fill", "client cpu", "server cpu",
             "of which worker", "others", "tries"]  # fmt: skip
    lines = []
    for row in rows:
        n = max(1, len(row.latencies))
        server = sum(row.server_cpu.values())
        lines.append([
            str(row.clients), str(row.sent), str(sum(row.errors.values())),
            f"{row.percentile(0.50):.1f}", f"{row.percentile(0.95):.1f}",
            f"{row.percentile(0.99):.1f}", f"{row.percentile(0.99) / row.percentile(0.50):.2f}",
            f"{row.images_per_s:.1f}", f"{row.ceiling:.1f}",
            f"{row.images_per_s / row.ceiling:.2f}",
            f"{row.mean_batch:.1f}", f"{row.mean_batch / max_batch:.2f}",
            f"{1000 * row.client_cpu / n:.1f} ms", f"{1000 * server / n:.1f} ms",
            f"{1000 * row.server_cpu.get('worker', 0.0) / n:.1f} ms", f"{row.others:.2f}",
            str(row.attempts),
        ])  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for line in lines:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
    for row in rows:
        if row.errors:
            print(f"  {row.clients} clients, errors: {row.errors}")
        if row.gpu:
            print(f"  {row.clients} clients: {row.gpu}")
    split: dict[str, float] = {}
    for row in rows:
        for role, seconds in row.server_cpu.items():
            split[role] = split.get(role, 0.0) + seconds
    images = sum(len(row.latencies) for row in rows) or 1
    print("  server CPU per image over the table, by process: " + ", ".join(
        f"{role} {1000 * seconds / images:.2f} ms" for role, seconds in sorted(split.items())
        if seconds >= 0.005
    ))  # fmt: skip


def one_size(size: int, folder: Path, args: argparse.Namespace, gpu: bool,
             memory: bool) -> None:  # fmt: skip
    package, settings = write_model(folder, args.model_type, size)
    images = jpegs(size, args.images)
    bodies = request_bodies(images, args.route)
    model_id = str(json.loads((package / "serving.json").read_text())["model"]["name"])
    path = ("/v1/models/default:predict" if args.route == "tf_serving"
            else f"/v1/{model_id}:predict")  # fmt: skip
    top = Ceiling(package, images, args.max_batch_size)
    started = time.perf_counter()
    server = start_server(package, folder, args, args.ready_seconds)
    try:
        print(f"\n[{size}px] server ready in {time.perf_counter() - started:.1f} s; processes: "
              + ", ".join(f"{role} {pid}" for pid, role in server.roles().items()),
              flush=True)  # fmt: skip
        idle_before = server.cpu()
        time.sleep(2.0)
        idle = sum(server.cpu().values()) - sum(idle_before.values())
        url = server.url + path
        measured(server, url, bodies, max(args.clients), 4 * max(args.clients), 60)  # warm-up
        for _ in range(args.retries + 1):  # the ceiling on batches of 1, for comparison
            wait_quiet(server, args.quiet, args.quiet_wait)
            span = Others(server)
            single = top.measure(args.ceiling_seconds, batch=1)
            if span.cores() < args.quiet:
                break
        rows = []
        for clients in args.clients:
            for attempt in range(1, args.retries + 2):
                waited = wait_quiet(server, args.quiet, args.quiet_wait)
                span = Others(server)
                before = top.measure(args.ceiling_seconds)
                row = measured(server, url, bodies, clients, args.requests, args.level_seconds,
                               gpu=gpu and clients == 16)  # fmt: skip
                after = top.measure(args.ceiling_seconds)
                row.ceiling, row.others, row.attempts = (before + after) / 2, span.cores(), attempt
                print(f"  {clients:>3} clients: {row.sent} requests in {row.seconds:.1f} s, "
                      f"{row.images_per_s:.1f} images/s; ceiling {before:.1f} before, "
                      f"{after:.1f} after; others {row.others:.2f} cores (waited {waited:.0f} s "
                      "for them to fall)", flush=True)  # fmt: skip
                if row.others < args.quiet:
                    break
            rows.append(row)
        memory_report = run_memory(server, url, bodies, args) if memory else []
    finally:
        stopped = stop_server(server)
    model = settings.model
    table(f"{size}x{size} JPEGs, {args.model_type} ({model.constructor}) at {list(model.size)} px, "
          f"max batch {args.max_batch_size}, batch timeout {args.batch_timeout_ms:g} ms, "
          f"{args.workers} worker(s), route {args.route}", rows, args.max_batch_size)  # fmt: skip
    print(f"  ceiling: decode + transform + forward on batches of {args.max_batch_size} in this "
          f"process ({'GPU' if gpu else f'{os.cpu_count()} threads'}), the mean of "
          f"{args.ceiling_seconds:g} s before and {args.ceiling_seconds:g} s after the row, the "
          f"server idle; on batches of 1: {single:.1f} images/s")  # fmt: skip
    print(f"  idle server: {idle / 2.0:.2f} cores busy while no request came (2 s)")
    for line in memory_report:
        print("  " + line)
    print(f"  stop: {stopped}")


def run_memory(server: Server, url: str, bodies: list[bytes], args: Any) -> list[str]:
    """``--memory-requests`` at 16 clients, the tree's RSS sampled every 5 % of them."""
    total, step = args.memory_requests, max(1, args.memory_requests // 20)
    samples: list[tuple[int, dict[int, int]]] = [(0, server.rss())]
    pss_before = server.pss()

    def on_progress(sent: int) -> None:
        if sent % step == 0:
            samples.append((sent, server.rss()))

    level = measured(server, url, bodies, 16, total, args.memory_seconds, on_progress)
    samples.append((level.sent, server.rss()))
    pss_after = server.pss()
    roles = server.roles()
    sums = [(sent, sum(rss.values())) for sent, rss in samples]
    middle = min(sums, key=lambda s: abs(s[0] - level.sent / 2))
    first, last = sums[0], sums[-1]
    grew = (last[1] - middle[1]) / middle[1]
    lines = [
        f"memory, {level.sent} requests at 16 clients ({level.images_per_s:.1f} images/s, "
        f"others {level.others:.2f} cores, "
        f"{sum(level.errors.values())} errors{', ' + str(level.errors) if level.errors else ''}): "
        f"server tree RSS {first[1] / MIB:.0f} MiB at the start, {middle[1] / MIB:.0f} MiB after "
        f"{middle[0]}, {last[1] / MIB:.0f} MiB after {last[0]}: second half "
        f"{100 * grew:+.1f} % ({'stopped growing' if grew < 0.02 else 'STILL GROWING'})",
        "  by process, start -> end: " + ", ".join(
            f"{roles.get(pid, 'other')} {samples[0][1].get(pid, 0) / MIB:.0f} -> "
            f"{rss / MIB:.0f} MiB" for pid, rss in samples[-1][1].items()
        ),
        f"  PSS (shared pages counted once) {pss_before / MIB:.0f} -> {pss_after / MIB:.0f} MiB",
        "  every 5 %: " + " ".join(f"{total_ / MIB:.0f}" for _, total_ in sums),
    ]  # fmt: skip
    return lines


# -- the machine ---------------------------------------------------------------------------------


def machine() -> tuple[str, bool]:
    import torch

    cores = os.cpu_count()
    load_average = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    line = (f"{platform.processor() or platform.machine()}, {cores} cores (load average "
            f"{load_average}), Python {platform.python_version()}, "
            f"torch {torch.__version__}")  # fmt: skip
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        found = subprocess.run(query, capture_output=True, text=True).stdout.strip()
        line += f"; GPU: {found or 'nvidia-smi answered nothing'}"
        return line, torch.cuda.is_available()
    return line + "; no GPU (no nvidia-smi)", False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="per concurrency level")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout-ms", type=float, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--request-timeout-seconds", type=float, default=60)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--small-size", type=int, default=32)
    parser.add_argument("--model-type", default="mobile-versatile-1")
    parser.add_argument("--route", choices=["tf_serving", "automl"], default="tf_serving")
    parser.add_argument("--images", type=int, default=64, help="distinct JPEGs")
    parser.add_argument("--ceiling-seconds", type=float, default=3)
    parser.add_argument("--level-seconds", type=float, default=180, help="at most, per level")
    parser.add_argument("--memory-requests", type=int, default=2000)
    parser.add_argument("--memory-seconds", type=float, default=600)
    parser.add_argument("--ready-seconds", type=float, default=180)
    parser.add_argument("--quiet", type=float, default=0.25,
                        help="cores other processes may keep busy during a row")  # fmt: skip
    parser.add_argument("--quiet-wait", type=float, default=120,
                        help="seconds to wait at most for them to fall under --quiet")  # fmt: skip
    parser.add_argument("--retries", type=int, default=2, help="of a row they disturbed")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    import logging

    logging.disable(logging.WARNING)
    python = sys.executable
    if python.startswith(os.getcwd()):
        python = os.path.relpath(python)
    print("command: " + shlex.join([python, *sys.argv]))
    line, gpu = machine()
    print(f"machine: {line}")
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        os.environ["VISION_TRAINER_HOME"] = str(folder)  # read_package's Workspace, this process's
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        one_size(args.size, folder, args, gpu, memory=not args.skip_memory)
        if not args.skip_small:
            one_size(args.small_size, folder, args, gpu, memory=False)
    print("\nload average at the end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
