"""download: corpus sources → data/raw/corpus.txt (clean UTF-8) + documents.bin, SFT/DPO data verbatim, a manifest."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.common.atomic import atomic_path, write_json
from pipeline.common.config import load_params
from pipeline.common.errors import exit_on_error
from pipeline.common.hashing import sha256_file
from pipeline.common.stage_timing import timed
from pipeline.data.corpus import CORPUS, DOCUMENTS, DownloadCache, build_corpus, copy_json_source

OUT = Path("data/raw")
PARAMS = ("data", "corpus", "sft.data", "dpo.data")


@exit_on_error
@timed
def main() -> None:
    params = load_params(sections=PARAMS)
    cache = DownloadCache.from_params(params.data)
    with atomic_path(OUT) as tmp:
        tmp.mkdir()
        sources = build_corpus(
            params.corpus.sources,
            cache,
            tmp,
            gutenberg=params.corpus.strip_gutenberg,
            normalise=params.corpus.normalize,
            unwrap=params.corpus.unwrap,
        )
        documents = sum(s["documents"] for s in sources)
        files = {
            CORPUS: {"bytes": (tmp / CORPUS).stat().st_size, "sha256": sha256_file(tmp / CORPUS)},
            DOCUMENTS: {"documents": documents, "bytes": (tmp / DOCUMENTS).stat().st_size},
            "sft.json": copy_json_source(params.sft.data, cache, "sft.data", tmp / "sft.json"),
            "dpo.json": copy_json_source(params.dpo.data, cache, "dpo.data", tmp / "dpo.json"),
        }
        write_json(tmp / "manifest.json", {"files": files, "sources": sources})
    print(
        f"download: {documents:,} document(s), {files[CORPUS]['bytes']:,} bytes of text → {OUT}/",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
