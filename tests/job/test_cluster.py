"""A job on a cluster of several nodes (``ray.cluster_utils.Cluster``): the Segmenters spread
over the nodes, and a node lost mid-run loses no image.

One cluster for the module: a head and three nodes with one (simulated) GPU each, started once
(each raylet costs seconds of CPU to start on the 2-core CI machine). The node-lost test removes
a node, so it runs last.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image
from readback import check_output, read_png

from helpers import EXPECTED, drawn, many_images, segmenter_processes, write_corpus
from seglabel.job.pipeline import label


@pytest.fixture(scope="module")
def three_nodes():
    """The module's cluster, this process's Ray connected to it; its GPU nodes."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(3)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_node_cluster_spreads_work(three_nodes, checkpoints, tmp_path):
    """Raylets with one (simulated) GPU each: two Segmenter actors, one per node."""
    corpus = write_corpus(tmp_path / "images")
    many = corpus / "many"
    many.mkdir()
    for i in range(24):
        drawn(40 + i, 30 + i, i).save(many / f"d{i:02d}.png")
    expected = dict(
        EXPECTED, **{f"many/d{i:02d}.png": Image.open(many / f"d{i:02d}.png").size for i in range(24)}
    )
    two = label(
        str(corpus),
        str(tmp_path / "two"),
        model=str(checkpoints["instance"]),
        num_gpus=2,
        batch_size=2,
        score_threshold=0.3,
        # The "GPUs" are CPUs: bf16 (a GPU's default) gives NaN there at batch 1, and the
        # two runs batch the images differently (blocks are sized by the Segmenters).
        dtype="fp32",
    )
    one = label(
        str(corpus),
        str(tmp_path / "one"),
        model=str(checkpoints["instance"]),
        num_gpus=1,
        batch_size=2,
        score_threshold=0.3,
        dtype="fp32",
    )
    assert len(two.actors) == 2 and len({a.split("/")[0] for a in two.actors}) == 2, two.actors
    assert len(one.actors) == 1
    success = json.loads((tmp_path / "two" / "_SUCCESS").read_text())
    assert len(success["actors"]) == 2
    rows_two = check_output(str(tmp_path / "two"), "instance", expected)
    rows_one = check_output(str(tmp_path / "one"), "instance", expected)
    for key, row in rows_two.items():
        other = rows_one[key]
        if row["status"] != "ok":
            continue
        assert [(s["id"], s["label_id"]) for s in row["segments"]] == [
            (s["id"], s["label_id"]) for s in other["segments"]
        ]
        a, b = np.array(read_png(row["mask_uri"])), np.array(read_png(other["mask_uri"]))
        assert (a == b).mean() >= 0.9999


def test_worker_node_lost_from_cluster(three_nodes, checkpoints, tmp_path, monkeypatch):
    import seglabel.job.pipeline

    monkeypatch.setattr(seglabel.job.pipeline, "BLOCK_ROWS", 4)  # enough blocks for two Segmenters

    root = tmp_path / "in"
    expected = many_images(root, 60)
    out = tmp_path / "out"
    cluster, nodes = three_nodes

    def node_with_segmenter():
        pids = {p.pid for p in segmenter_processes()}
        for node in nodes:
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            if pids & {c.pid for c in raylet.children(recursive=True)}:
                return node
        return None

    lost = {}

    def remove_node():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = list((out / "metadata").glob("*.parquet")) if (out / "metadata").exists() else []
            node = node_with_segmenter() if len(done) >= 2 else None
            if node is not None:
                cluster.remove_node(node, allow_graceful=False)
                lost["node"] = node
                return
            time.sleep(0.05)

    thread = threading.Thread(target=remove_node, daemon=True)
    thread.start()
    summary = label(
        str(root), str(out), model=str(checkpoints["instance"]), num_gpus=2, batch_size=2, rows_per_part=4
    )
    thread.join(5)
    assert lost, "no node was removed: the test proved nothing"
    check_output(str(out), "instance", expected)
    assert len({a.split("/")[0] for a in summary.actors}) >= 2
