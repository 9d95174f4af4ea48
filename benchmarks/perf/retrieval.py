"""Retrieval throughput: feature extraction of the GeM model and faiss search, flat against IVF.

    python -m benchmarks.perf.retrieval --backbones resnet50 --image-size 224 --gallery 100000 1000000 \
        --dims 512 2048 --queries 1000 --out runs/perf/retrieval.json

- ``extract``: images/s of :class:`~lightning_modules.retrieval.model.LandmarkRetrieval`'s
  test-time embedding (random weights, random images: the cost does not depend on them), batches
  of ``--batch``, after one warm-up batch, on ``--device``.
- ``search``: for each gallery size and dimension, random unit vectors (a gallery of clusters,
  so that IVF has structure to find), the time to build the index (IVF: its training on the
  gallery) apart from the time to search ``--queries`` queries for their 100 nearest, ``flat`` (exact inner
  product, the default of every visionzoo protocol) against ``ivf`` (``--nlist`` cells, default
  4·√N, ``nprobe`` 16), and IVF's recall@100 of the flat result (the baseline, in the same run).

faiss runs on the CPU through OpenBLAS for flat search: with ``OPENBLAS_CORETYPE`` set to a core
type other than the machine's (a common leftover in cluster environments), its kernels can run
several times slower; the script prints the variable's value beside the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.metrics.retrieval import SearchOptions, build_index, search
from lightning_modules.retrieval.model import LandmarkRetrieval


def extraction(backbone: str, image_size: int, batch: int, batches: int, device: str) -> float:
    """Images/s of the test-time embedding."""
    model = LandmarkRetrieval(num_classes=None, backbone=backbone, pretrained=False).eval().to(device)
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    with torch.no_grad():
        model.embed(images)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(batches):
            model.embed(images)
        if device == "cuda":
            torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - started)


def clustered(count: int, dim: int, generator: np.random.Generator, clusters: int = 1000) -> np.ndarray:
    """``count`` unit vectors around ``clusters`` random centres."""
    centres = generator.standard_normal((clusters, dim), dtype=np.float32)
    vectors = centres[generator.integers(clusters, size=count)] + 0.5 * generator.standard_normal((count, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def search_rows(gallery_size: int, dim: int, queries: int, nlist: int | None, k: int = 100) -> list[dict]:
    """Flat and IVF search of ``queries`` queries in a gallery of ``gallery_size`` x ``dim``."""
    generator = np.random.default_rng(0)
    gallery = clustered(gallery_size, dim, generator)
    query = clustered(queries, dim, generator)
    rows, exact = [], None
    for options in (SearchOptions("flat"), SearchOptions("ivf", nlist=nlist)):
        started = time.perf_counter()
        index = build_index(gallery, options)
        built = time.perf_counter()
        _, neighbours = search(query, index, k)
        elapsed = time.perf_counter() - built
        if exact is None:
            exact, recall = neighbours, 1.0
        else:
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, neighbours)]))
        rows.append({"gallery": gallery_size, "dim": dim, "index": options.index, "nlist": options.nlist, "queries": queries,
                     "build_s": built - started, "search_s": elapsed, "ms_per_query": 1000 * elapsed / queries, "recall@100_of_flat": recall})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.retrieval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="*", default=["resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gallery", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nlist", type=int, help="IVF cells (default 4 sqrt(N)); k-means on a 2-core CPU needs fewer at 1e6")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    results: dict = {"threads": faiss.omp_get_max_threads(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
                     "device": args.device, "extract": [], "search": []}
    for backbone in args.backbones:
        rate = extraction(backbone, args.image_size, args.batch, args.batches, args.device)
        results["extract"].append({"backbone": backbone, "image_size": args.image_size, "images_per_s": rate})
        print(f"extract {backbone} at {args.image_size}px on {args.device}: {rate:.1f} images/s")
    print(f"\nsearch, {results['threads']} threads, OPENBLAS_CORETYPE={results['OPENBLAS_CORETYPE']}")
    print("| gallery | dim | index | build s | ms/query | recall@100 of flat |\n|---|---|---|---|---|---|")
    for size in args.gallery:
        for dim in args.dims:
            for row in search_rows(size, dim, args.queries, args.nlist):
                results["search"].append(row)
                print(f"| {size} | {dim} | {row['index']} | {row['build_s']:.2f} | {row['ms_per_query']:.3f} | "
                      f"{row['recall@100_of_flat']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
