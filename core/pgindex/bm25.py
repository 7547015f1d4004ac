"""Exact BM25 top-k in PL/pgSQL with MaxScore pruning: the function one node and every shard run.

The plain way to rank by BM25 in SQL sums every posting of every query term and sorts the
chunks; at 100k chunks a question's common terms have tens of thousands of postings each, and
that sum was most of a hybrid search's time. A common term has a low idf, though, so a chunk
that holds only common terms cannot reach the top ``depth``: MaxScore (Turtle & Flood, 1995)
reads the postings of the rare terms only, and probes the common ones for the chunks that can
still make it. Exactly the same ranking and scores as the plain sum (rank-bm25's definition,
float rounding aside), never an approximation:

1. Each (collection, term) pair of the query gets an upper bound of what it can add to a chunk:
   ``weight · (k1+1) / (1 + k1·(1−b)/max_tf + k1·b·min(dl/tf)/avgdl)``, with ``max_tf`` and
   ``min(dl/tf)`` over the term's postings (``rag_index.terms``, kept by the insert trigger of
   migration 0007; deletes leave them as they are, which only loosens the bound). It holds for
   any avgdl: the score's tf part is ``(k1+1) / (1 + k1·(1−b)/tf + k1·b·(dl/tf)/avgdl)``.
2. Pairs are taken by bound, best first. After the first ``i``, θ is the ``depth``-th best sum
   over their postings (a lower bound of the true ``depth``-th best score: terms only add).
   When the bounds of the remaining pairs sum to less than θ, a chunk holding none of the first
   ``i`` terms cannot reach the top ``depth`` (not even tie with it), so the candidates are the
   chunks of those postings whose partial sum plus the remaining bounds reaches θ; each gets its
   exact score by probing the remaining terms' postings on the primary key.
3. Otherwise (no prefix of pairs prunes, a path-prefix filter, a non-positive weight, or the
   pairs read so far already hold a quarter of all the query's postings, or more chunks than the
   remaining postings / 20 would need probing) the plain sum runs.

The relative margins (1e-9) keep float rounding on the safe side of every comparison.
"""

from __future__ import annotations

__all__ = ["PROBE_COST", "READ_SHARE", "bm25_function"]

PROBE_COST = 20.0
"""A candidate's probes (one primary-key lookup per remaining pair) cost about as much as summing
this many postings (measured at 100k chunks): with more candidates than the remaining postings /
``PROBE_COST`` / pairs, the plain sum wins."""
READ_SHARE = 4.0
"""Pruning is tried only while the postings read are under 1 / ``READ_SHARE`` of the question's."""


def bm25_function(schema: str) -> str:
    """``CREATE OR REPLACE FUNCTION <schema>.bm25_top(...)`` over ``<schema>.postings`` and ``.chunks``.

    Arguments of the SQL function: per (collection, term) pair ``p_collections``, ``p_terms``,
    ``p_weights`` (``reps · idf``), ``p_avgdls``, ``p_bounds`` (step 1 of the module docstring),
    ``p_dfs`` (postings of the pair, to decide when pruning cannot pay); then ``p_k1``, ``p_b``,
    ``p_depth`` and ``p_prefix`` (a LIKE pattern on the chunk path, or NULL); ``p_probe_cost`` and
    ``p_read_share`` (:data:`PROBE_COST`, :data:`READ_SHARE`; tests pass 0 and 1 to prune whenever
    the bounds allow). Returns the ``p_depth`` best ``(chunk_id, score)``, best first, ties by id.
    """
    return f"""CREATE OR REPLACE FUNCTION {schema}.bm25_top(
    p_collections integer[], p_terms text[], p_weights double precision[], p_avgdls double precision[],
    p_bounds double precision[], p_dfs bigint[], p_k1 double precision, p_b double precision, p_depth integer,
    p_prefix text, p_probe_cost double precision DEFAULT {PROBE_COST},
    p_read_share double precision DEFAULT {READ_SHARE})
RETURNS TABLE (chunk_id bigint, score double precision) LANGUAGE plpgsql
SET work_mem = '64MB' SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    n integer := coalesce(cardinality(p_terms), 0);
    oc integer[]; ot text[]; ow double precision[]; oa double precision[]; ob double precision[]; od bigint[];
    total bigint;
    seen bigint := 0;
    rest double precision;
    theta double precision;
    ok boolean;
    budget integer;
    tops double precision[];
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(u.c ORDER BY u.bnd DESC, u.c, u.t), array_agg(u.t ORDER BY u.bnd DESC, u.c, u.t),
           array_agg(u.w ORDER BY u.bnd DESC, u.c, u.t), array_agg(u.a ORDER BY u.bnd DESC, u.c, u.t),
           array_agg(u.bnd ORDER BY u.bnd DESC, u.c, u.t), array_agg(u.df ORDER BY u.bnd DESC, u.c, u.t),
           sum(u.df), bool_and(u.w > 0)
    INTO oc, ot, ow, oa, ob, od, total, ok
    FROM unnest(p_collections, p_terms, p_weights, p_avgdls, p_bounds, p_dfs) AS u(c, t, w, a, bnd, df);
    IF p_prefix IS NULL AND ok THEN
        FOR i IN 1 .. n - 1 LOOP
            seen := seen + od[i];
            -- Pruning pays only while the postings read are a small part of the question's.
            EXIT WHEN seen * p_read_share > total;
            CONTINUE WHEN seen < p_depth;
            rest := (SELECT sum(x) FROM unnest(ob[i + 1:n]) AS x) * (1 + 1e-9);
            -- θ cannot exceed the bounds read so far: no need to compute it when they fall short.
            CONTINUE WHEN rest >= (SELECT sum(x) FROM unnest(ob[1:i]) AS x);
            -- More candidates to probe than this and the plain sum wins (PROBE_COST).
            budget := CASE WHEN p_probe_cost > 0
                THEN least(greatest(p_depth, (total - seen) / (p_probe_cost * (n - i))), 1e9)::integer
                ELSE 1000000000 END;
            tops := ARRAY(
                SELECT sum(u.w * (p.tf * (p_k1 + 1)) / (p.tf + p_k1 * (1 - p_b + p_b * p.doc_len / u.a))) AS s
                FROM unnest(oc[1:i], ot[1:i], ow[1:i], oa[1:i]) AS u(c, t, w, a)
                JOIN {schema}.postings p ON p.collection_id = u.c AND p.term = u.t
                GROUP BY p.chunk_id
                ORDER BY s DESC
                LIMIT budget + 1
            );
            theta := tops[p_depth] * (1 - 1e-9);
            CONTINUE WHEN theta IS NULL OR rest >= theta;
            EXIT WHEN tops[budget + 1] + rest >= theta;  -- over budget (NULL: within it)
            -- Sent only to a client that asked for DEBUG messages (the tests check pruning happens).
            RAISE DEBUG 'bm25_top pruned: postings of % of % term pairs read', i, n;
            RETURN QUERY
            WITH alive AS MATERIALIZED (
                SELECT x.id, x.s FROM (
                    SELECT p.chunk_id AS id,
                           sum(u.w * (p.tf * (p_k1 + 1)) / (p.tf + p_k1 * (1 - p_b + p_b * p.doc_len / u.a))) AS s
                    FROM unnest(oc[1:i], ot[1:i], ow[1:i], oa[1:i]) AS u(c, t, w, a)
                    JOIN {schema}.postings p ON p.collection_id = u.c AND p.term = u.t
                    GROUP BY p.chunk_id
                ) x
                WHERE x.s + rest >= theta
            ), r AS MATERIALIZED (
                SELECT * FROM unnest(oc[i + 1:n], ot[i + 1:n], ow[i + 1:n], oa[i + 1:n]) AS u(c, t, w, a)
            )
            SELECT alive.id, alive.s + coalesce(
                sum(r.w * (p.tf * (p_k1 + 1)) / (p.tf + p_k1 * (1 - p_b + p_b * p.doc_len / r.a))), 0)
            FROM alive CROSS JOIN r
            LEFT JOIN {schema}.postings p ON p.collection_id = r.c AND p.term = r.t AND p.chunk_id = alive.id
            GROUP BY alive.id, alive.s
            ORDER BY 2 DESC, 1
            LIMIT p_depth;
            RETURN;
        END LOOP;
    END IF;
    -- The plain sum. Two statements rather than "p_prefix IS NULL OR ...": each gets its own plan.
    IF p_prefix IS NULL THEN
        RETURN QUERY
        SELECT p.chunk_id,
               sum(u.w * (p.tf * (p_k1 + 1)) / (p.tf + p_k1 * (1 - p_b + p_b * p.doc_len / u.a)))
        FROM unnest(oc, ot, ow, oa) AS u(c, t, w, a)
        JOIN {schema}.postings p ON p.collection_id = u.c AND p.term = u.t
        GROUP BY p.chunk_id
        ORDER BY 2 DESC, 1
        LIMIT p_depth;
    ELSE
        RETURN QUERY
        SELECT p.chunk_id,
               sum(u.w * (p.tf * (p_k1 + 1)) / (p.tf + p_k1 * (1 - p_b + p_b * p.doc_len / u.a)))
        FROM unnest(oc, ot, ow, oa) AS u(c, t, w, a)
        JOIN {schema}.postings p ON p.collection_id = u.c AND p.term = u.t
        WHERE p.chunk_id IN (
            SELECT c.chunk_id FROM {schema}.chunks c
            WHERE c.collection_id = ANY(p_collections) AND c.path LIKE p_prefix ESCAPE '\\')
        GROUP BY p.chunk_id
        ORDER BY 2 DESC, 1
        LIMIT p_depth;
    END IF;
END $$"""
