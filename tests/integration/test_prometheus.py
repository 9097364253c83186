"""A real Prometheus server scrapes a real 2-process training run (torchrun, gloo, CPU).

The server is Debian's ``prometheus`` (``.ci/run`` installs it), started on 127.0.0.1 and
a free port with a throwaway TSDB, scraping both ranks' ports every second. After the
run, its HTTP API must show what the run did (both ranks up, images trained, finite
loss, lr, skip counts of a shard with corrupt members), and every PromQL expression of
the shipped alert rules and dashboard must parse and, unless it reads GPU series, return
data for that run.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from trainer.data import write_synthetic_shards

from ..conftest import free_port, needs_binary
from ..monitoring_exprs import DATA_NEEDS, all_exprs
from .helpers import metrics, overrides, run, torchrun_cmd

PROMETHEUS = shutil.which("prometheus")
pytestmark = needs_binary("prometheus", "prometheus")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:  # 400 on a PromQL parse error: return its body
            body = json.load(err)
        return body

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        body = self.api("query", query=expr, time=at)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """A base port with base+1 free too (one port per local rank)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, metrics_port: int) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: sam\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}', '127.0.0.1:{metrics_port + 1}']}}]\n")
    port = free_port()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={tmp / 'data'}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "prometheus.log", "wb"))
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{server.url}/-/ready", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp / "prometheus.log").read_text()
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _with_corrupt_members(src: Path, dst: Path) -> None:
    """``dst``: ``src``'s members, the first image's JPEG truncated, the second's JSON invalid."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        stems: list[str] = []
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            stem, ext = member.name.rsplit(".", 1)
            if stem not in stems:
                stems.append(stem)
            if ext == "jpg" and stems.index(stem) == 0:
                data = data[: len(data) // 3]
            elif ext == "json" and stems.index(stem) == 1:
                data = b"{not json"
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def scraped_run(prometheus: Prometheus, metrics_port: int, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("promrun")
    data = tmp / "data"
    write_synthetic_shards(str(data), num_images=8, num_shards=2, seed=1, min_side=96, max_side=160,
                           min_masks=2, max_masks=4)
    _with_corrupt_members(data / "sa_000001.tar", data / "sa_000002.tar")
    eval_dir = tmp / "eval"
    write_synthetic_shards(str(eval_dir), num_images=2, num_shards=1, seed=2, min_side=96, max_side=160,
                           min_masks=2, max_masks=3)
    run_dir = tmp / "run"
    start = time.time()
    proc = run(torchrun_cmd(2) + overrides(
        f"{data}/sa_*.tar", run_dir, "optim.max_iters=14", "optim.milestones=", "checkpoint.every=7",
        # Evaluate mid-run, not at the end: after the last step rank 1 may close its port
        # while rank 0 still evaluates, and the series are read where both ranks are up.
        f"eval.shards={eval_dir}/sa_*.tar", "eval.every=7", "eval.at_end=false", "eval.num_images=2",
        f"metrics.port={metrics_port}", "metrics.addr=127.0.0.1", "metrics.final_scrape_wait_s=15",
        "metrics.run_name=promtest", "metrics.peak_tflops=1"), timeout=300)  # a peak: MFU series on CPU
    end = time.time()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The last instant at which both ranks were still up: query everything there.
    body = prometheus.api("query_range", query='up{job="sam"} == 1', start=start, end=end, step=0.5)
    points = [{t for t, _ in series["values"]} for series in body["data"]["result"]]
    assert len(points) == 2, body
    at = max(points[0] & points[1])
    return {"run_dir": run_dir, "stderr": proc.stderr, "at": float(at), "end": end,
            "ports": (metrics_port, metrics_port + 1)}


def _by_rank(result: list[dict]) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in result}


def test_both_ranks_scraped_with_what_the_run_did(prometheus: Prometheus, scraped_run: dict) -> None:
    at = scraped_run["at"]
    assert {r["metric"]["instance"]: float(r["value"][1]) for r in prometheus.query('up{job="sam"}', at)} \
        == {f"127.0.0.1:{p}": 1.0 for p in scraped_run["ports"]}
    assert _by_rank(prometheus.query('sam_train_world_size{job="sam"}', at)) == {"0": 2.0, "1": 2.0}
    records = [r for r in metrics(scraped_run["run_dir"]) if "loss/total" in r]
    assert records[-1]["step"] == 14
    # Final values at the end of the run: each rank serves until one scrape has read its
    # last update, but the ranks finish at different moments, so at the last instant both
    # were up one of them may not have been scraped after its last step yet.
    final = scraped_run["end"]
    images = _by_rank(prometheus.query("last_over_time(sam_train_images_total[10m])", final))
    # Every rank trains on the same number of images per step; metrics.jsonl has rank 0's.
    assert images == {"0": sum(r["data/images"] for r in records), "1": sum(r["data/images"] for r in records)}
    assert _by_rank(prometheus.query("last_over_time(sam_train_step[10m])", final)) == {"0": 14.0, "1": 14.0}
    losses = prometheus.query('last_over_time(sam_train_loss{part="total"}[10m])', at)
    assert len(losses) == 2 and all(math.isfinite(float(r["value"][1])) for r in losses)
    assert all(float(r["value"][1]) > 0 for r in prometheus.query("last_over_time(sam_train_learning_rate[10m])", at))
    evals = prometheus.query('last_over_time(sam_train_eval_miou{metric="point1_conf"}[10m])', at)
    assert [r["metric"]["rank"] for r in evals] == ["0"]  # rank 0 evaluates


def test_skip_counters_match_the_corrupt_members(prometheus: Prometheus, scraped_run: dict) -> None:
    last = [r for r in metrics(scraped_run["run_dir"]) if "loss/total" in r][-1]
    expected = {k.removeprefix("data/skipped_"): v for k, v in last.items() if k.startswith("data/skipped_")}
    assert expected["corrupt_jpeg"] > 0 and expected["invalid_json"] > 0  # the fixture's corruption was met
    result = prometheus.query("sum by (reason) (last_over_time(sam_train_data_skipped_total[10m]))",
                              scraped_run["at"])
    assert {r["metric"]["reason"]: float(r["value"][1]) for r in result} == {k: float(v) for k, v in expected.items()}


def test_no_gpu_series_on_a_cpu_machine(prometheus: Prometheus, scraped_run: dict) -> None:
    assert prometheus.query('{__name__=~"sam_gpu_.*"}', scraped_run["at"]) == []
    assert "GPU series absent" in scraped_run["stderr"]


def test_every_rule_and_dashboard_expression_parses_and_returns_data(prometheus: Prometheus,
                                                                      scraped_run: dict) -> None:
    gpu_only, excused, empty = [], [], []
    for source, expr in all_exprs():
        body = prometheus.api("query", query=expr, time=scraped_run["at"])
        assert body["status"] == "success", f"{source}: {expr}: {body.get('error')}"
        if "sam_gpu_" in expr:
            gpu_only.append(source)
        elif not body["data"]["result"]:
            if source in DATA_NEEDS:  # needs what a 20 s run cannot have (e.g. an hour of history)
                excused.append(f"{source} ({DATA_NEEDS[source]})")
            else:
                empty.append(f"{source}: {expr}")
    assert not empty, "expressions without data for a real run:\n" + "\n".join(empty)
    assert len(excused) <= 1, excused  # only the hour-long throughput baseline may be empty here
    print(f"GPU-only expressions (no NVIDIA device here), parsed but not required to return data: {gpu_only}")
    print(f"non-GPU expressions whose data this short run cannot have: {excused}")
