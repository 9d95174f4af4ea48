"""Retrieval throughput: feature extraction of the GeM model and faiss search, flat against IVF.

    python -m benchmarks.perf.retrieval --backbones resnet50 --image-size 224 --gallery 100000 1000000 \
        --dims 512 2048 --queries 1000 --binary-bits 256 512 --out runs/perf/retrieval.json

- ``extract``: images/s of :class:`~lightning_modules.retrieval.model.LandmarkRetrieval`'s
  test-time embedding (random weights, random images: the cost does not depend on them), batches
  of ``--batch``, after one warm-up batch, on ``--device``.
- ``search``: for each gallery size and dimension, random unit vectors (a gallery of clusters,
  so that IVF has structure to find), the time to build the index (IVF: its training on the
  gallery) apart from the time to search ``--queries`` queries for their 100 nearest, ``flat`` (exact inner
  product, the default of every visionzoo protocol) against ``ivf`` (``--nlist`` cells, default
  4·√N, ``nprobe`` 16), and IVF's recall@100 of the flat result (the baseline, in the same run).

- ``binary``: for each gallery size and ``--binary-bits``, the same float gallery against binary
  codes of it (BEBR's search, :class:`~benchmarks.metrics.retrieval.BinaryRetrievalMetric`): the
  float flat index against the Hamming flat and HNSW indexes, side by side: index memory (the
  serialised index), build time, ms/query and queries/s for the 100 nearest, and recall@100 of
  the float result. The codes are the signs of a random Gaussian projection of the float vectors
  (a trained binarizer costs the same to search; its recall is the method's, measured by
  ``visionzoo test``, not here).

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

from benchmarks.metrics.retrieval import SearchOptions, build_binary_index, build_index, index_bytes, pack_bits, search
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


def clustered(count: int, dim: int, generator: np.random.Generator, clusters: int = 1000,
              centres: np.ndarray | None = None) -> np.ndarray:
    """``count`` unit vectors around ``clusters`` random centres (or the given ``centres``)."""
    centres = generator.standard_normal((clusters, dim), dtype=np.float32) if centres is None else centres
    clusters = len(centres)
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


def _recall(reference: np.ndarray, neighbours: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(reference, neighbours)]))


def binary_rows(gallery_size: int, dim: int, bits: int, queries: int, k: int = 100, chunk: int = 65536) -> list[dict]:
    """Float flat search against Hamming flat and HNSW search of ``bits``-bit codes of the same
    ``gallery_size`` x ``dim`` gallery."""
    generator = np.random.default_rng(0)
    centres = generator.standard_normal((1000, dim), dtype=np.float32)
    gallery = clustered(gallery_size, dim, generator, centres=centres)
    query = clustered(queries, dim, generator, centres=centres)  # queries of the gallery's clusters
    projection = generator.standard_normal((dim, bits), dtype=np.float32)
    codes = np.concatenate([pack_bits(gallery[i:i + chunk] @ projection) for i in range(0, gallery_size, chunk)])
    query_codes = pack_bits(query @ projection)
    rows, exact = [], None
    for space in ("float", "hamming", "hnsw"):
        started = time.perf_counter()
        if space == "float":
            index = build_index(gallery)
        else:
            index = build_binary_index(codes, "flat" if space == "hamming" else "hnsw")
        built = time.perf_counter()
        _, neighbours = search(query, index, k) if space == "float" else index.search(query_codes, k)
        elapsed = time.perf_counter() - built
        exact = neighbours if exact is None else exact
        rows.append({"gallery": gallery_size, "dim": dim, "bits": bits if space != "float" else 32 * dim, "space": space,
                     "index_mib": index_bytes(index) / 2**20, "build_s": built - started, "ms_per_query": 1000 * elapsed / queries,
                     "queries_per_s": queries / elapsed, "recall@100_of_float": _recall(exact, neighbours, k)})
        del index
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
    parser.add_argument("--binary-bits", type=int, nargs="*", default=[512],
                        help="code lengths of the binary-against-float table (none: skip it)")
    parser.add_argument("--binary-dim", type=int, default=512, help="the float dimension of the binary table")
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument("--skip-float-search", action="store_true", help="skip the flat-against-IVF table")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    results: dict = {"threads": faiss.omp_get_max_threads(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
                     "device": args.device, "extract": [], "search": [], "binary": []}
    for backbone in [] if args.skip_extract else args.backbones:
        rate = extraction(backbone, args.image_size, args.batch, args.batches, args.device)
        results["extract"].append({"backbone": backbone, "image_size": args.image_size, "images_per_s": rate})
        print(f"extract {backbone} at {args.image_size}px on {args.device}: {rate:.1f} images/s")
    print(f"\nsearch, {results['threads']} threads, OPENBLAS_CORETYPE={results['OPENBLAS_CORETYPE']}")
    if not args.skip_float_search:
        print("| gallery | dim | index | build s | ms/query | recall@100 of flat |\n|---|---|---|---|---|---|")
    for size in [] if args.skip_float_search else args.gallery:
        for dim in args.dims:
            for row in search_rows(size, dim, args.queries, args.nlist):
                results["search"].append(row)
                print(f"| {size} | {dim} | {row['index']} | {row['build_s']:.2f} | {row['ms_per_query']:.3f} | "
                      f"{row['recall@100_of_flat']:.3f} |")
    if args.binary_bits:
        print(f"\nbinary against float, {args.binary_dim}-d float vectors\n"
              "| gallery | space | bits | index MiB | build s | ms/query | queries/s | recall@100 of float |\n|---|---|---|---|---|---|---|---|")
    for size in args.gallery if args.binary_bits else []:
        for bits in args.binary_bits:
            for row in binary_rows(size, args.binary_dim, bits, args.queries):
                if row["space"] == "float" and bits != args.binary_bits[0]:
                    continue  # the float baseline once per gallery
                results["binary"].append(row)
                print(f"| {size} | {row['space']} | {row['bits']} | {row['index_mib']:.1f} | {row['build_s']:.2f} | "
                      f"{row['ms_per_query']:.3f} | {row['queries_per_s']:.0f} | {row['recall@100_of_float']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
