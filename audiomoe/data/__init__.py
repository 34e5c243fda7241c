"""Data: manifests and sources, the loader and samplers, the built-in offline corpus, test tones.

Public names (loaded on first use, so ``import audiomoe.data`` stays light)::

    from audiomoe.data import build_loader, builtin_corpus
    manifest = builtin_corpus()                       # made once into a cache dir
    loader = build_loader({"sources": {"all": {"path": str(manifest)}}, "max_seconds": 60})
    for batch in loader:                              # AudioBatch, one epoch
        ...
"""

from __future__ import annotations

from audiomoe.core.lazy import lazy_getattr

_LAZY = {
    "Item": "audiomoe.data.manifest",
    "read_manifest": "audiomoe.data.manifest",
    "write_manifest": "audiomoe.data.manifest",
    "manifest_from_csv": "audiomoe.data.csv_import",
    "DataSource": "audiomoe.data.sources",
    "DataSpec": "audiomoe.data.spec",
    "load_data_spec": "audiomoe.data.spec",
    "BucketBatchSampler": "audiomoe.data.sampling",
    "AudioLoader": "audiomoe.data.loader",
    "ItemDataset": "audiomoe.data.loader",
    "build_loader": "audiomoe.data.loader",
    "make_corpus": "audiomoe.data.corpus.make",
    "builtin_corpus": "audiomoe.data.corpus.make",
    "encode_manifest": "audiomoe.data.codes",
    "corpus_codes": "audiomoe.data.codes",
    "codec_codes": "audiomoe.data.codes",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
