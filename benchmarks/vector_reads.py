"""Reading every embedding of a view: dinoprop against FiftyOne, side by side.

Usage::

    python benchmarks/vector_reads.py             # 100k and 300k samples, 384-d
    python benchmarks/vector_reads.py --num 50000 # one size

In a private FiftyOne database, ``num`` samples get a 384-d float32 vector
as ``compute_embeddings`` stores it (an uncompressed zlib stream, inserted
by ``scale.py``), and the same vectors are read three ways, three times
each (the best of the three is reported, so the database's cache is warm
for all of them):

- ``load_embeddings``: dinoprop's reader, which slices IDs and vectors out
  of the raw BSON batches (:mod:`dinoprop.vector_reads`);
- document by document: the stored values read with
  :func:`dinoprop.bulk_reads.raw_values` and joined by
  :func:`dinoprop.vector_reads.decode_vectors` (dinoprop's reader before);
- FiftyOne: ``values(["id", field])``, what FiftyOne Brain's
  ``get_embeddings`` reads with.

The last printed line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import numpy as np

from private_db import use_private_database

DIM = 384
REPEATS = 3


def readers():
    """``{name: read(dataset) -> (ids, N x DIM array)}``."""
    from dinoprop.bulk_reads import raw_values
    from dinoprop.core import load_embeddings
    from dinoprop.vector_reads import decode_vectors

    def document_by_document(dataset):
        ids, stored = raw_values(dataset, ["_id", "dinoprop_embedding"])
        return [str(i) for i in ids], decode_vectors(stored)

    def fiftyone_values(dataset):
        ids, vectors = dataset.values(["id", "dinoprop_embedding"])
        return ids, np.stack(vectors)

    return {
        "load_embeddings (raw batches)": lambda d: load_embeddings(d, "dinoprop_embedding"),
        "document by document (before)": document_by_document,
        "FiftyOne values()": fiftyone_values,
    }


def measure(num: int) -> list:
    """One row per reader: the best of :data:`REPEATS` reads of ``num``
    vectors, checked against what was written."""
    import fiftyone as fo

    from scale import insert_samples

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((num, DIM), dtype=np.float32)
    dataset = fo.Dataset()
    try:
        ids = insert_samples(dataset, vectors, {})  # as compute_embeddings stores them
        rows = []
        for name, read in readers().items():
            seconds = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                got_ids, got = read(dataset)
                seconds.append(time.perf_counter() - start)
                assert list(got_ids) == ids and np.array_equal(got, vectors), name
                del got
            rows.append({"num": num, "reader": name, "seconds": min(seconds)})
            print("  %9s x %d-d  %-32s %6.2f s" % (f"{num:,}", DIM, name, min(seconds)), flush=True)
        return rows
    finally:
        dataset.delete()


def report(rows: list) -> str:
    lines = [
        "| samples | reader | seconds | FiftyOne values() / this |",
        "|---|---|---:|---:|",
    ]
    for row in rows:
        fiftyone = next(
            r["seconds"] for r in rows if r["num"] == row["num"] and r["reader"] == "FiftyOne values()"
        )
        lines.append("| %s | %s | %.2f | %.1fx |" % (
            f"{row['num']:,}", row["reader"], row["seconds"], fiftyone / row["seconds"]))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, action="append",
                        help="samples (repeatable; default 100,000 and 300,000)")
    args = parser.parse_args()
    use_private_database()
    rows = []
    for num in args.num or [100_000, 300_000]:
        rows += measure(num)
    print()
    print(report(rows))
    print(json.dumps({
        "date": datetime.date.today().isoformat(),
        "machine": "%s, %s" % (platform.machine(), platform.processor() or platform.system()),
        "rows": rows,
    }))


if __name__ == "__main__":
    main()
