"""The ``postgres`` retrieval backend: pgvector (HNSW) and BM25 postings in PostgreSQL.

``writer`` puts chunks into the index inside the caller's transaction (the one that writes the
chunk rows), ``index`` searches it and answers the catalog questions the API asks of an index
store, ``shards`` spreads the heavy part (vectors, postings) over PL/Proxy shard clusters with
the BM25 statistics kept global on the coordinator. SQLAlchemy lives here, not in ``retrieval``
(a leaf that imports no database library); the tokenizer, BM25 parameters and fusion are the
``retrieval`` floor's own, so both backends rank by one definition.
"""
