"""Data: preparation (filters, dedup), tokenizer, shards, the resumable stream, collators, the loader.

Entry points: :func:`data.prepare.prepare`, :func:`data.tokenizer.train_tokenizer` /
:func:`data.tokenizer.load_tokenizer`, :func:`data.make_shards.make_shards` and
:func:`data.loader.build_loader`.
"""
