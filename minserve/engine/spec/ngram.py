"""Prompt lookup (vLLM's "ngram" method): draft the tokens that followed the latest earlier
occurrence of the request's last n tokens, in its own prompt and output. No model; numpy only."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(token_ids: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """token_ids [L] int64 (prompt + output). The longest n in [min_n, max_n] whose last-n
    tokens occur earlier, at the latest such place with k tokens after it (else the first),
    and the up to k tokens after it:

        ... a b c d e ... a b c | -> propose d e (n = 3, k = 2)
            ^^^^^ match         ^^^^^ suffix

    An earlier match may overlap the suffix (a run "x x x x" proposes more x's)."""
    L = token_ids.shape[0]
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = token_ids[L - n:]
        # windows that start at i < L - n and end before the last token (so one follows)
        windows = sliding_window_view(token_ids[:L - 1], n)
        # PERF: compare the rare last token first, then the whole window only where it matched
        starts = np.flatnonzero(windows[:, -1] == suffix[-1])
        if starts.size == 0:
            continue
        hits = starts[(windows[starts] == suffix).all(axis=1)]
        if hits.size:
            whole = hits[hits + n + k <= L]
            start = int(whole[-1] if whole.size else hits[0]) + n
            return token_ids[start:start + k].tolist()
    return []
