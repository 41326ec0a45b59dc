"""The Triton kernels of :mod:`hqqlora._decode` (what each computes, the MODES of
``_main_kernel`` and the precision of each: that module's docstring; which launch each
call takes: its tables and ``_launch``).

- ``_shrink_kernel``: ``t = x @ A_kᵀ`` in float32, split along ``in`` (one partial per
  split), zeroing the main kernel's counters on the way.
- ``_bank_shrink_kernel``: the same over a bank of several adapters above 16 rows under
  MODE 8, and before the one-row tensor-core GEMV (one adapter or a bank), a program per
  row and slice of its adapter's rank, ``t`` whole.
- ``_bank_terms_kernel``: after it (``GATHER_SIDE``), each row's ``s_k · t[i] @ B[k_i]ᵀ``
  in float32, for the main kernel to add.
- ``_main_kernel``: the base term from HQQ's packed codes (MODES 0-7), or the partials of
  the Gluon base kernel (MODE 8), plus the adapter terms, DoRA and the bias.
"""

from __future__ import annotations

try:  # Triton is optional: only CUDA decode uses these kernels.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]  # Triton ships no types for its JIT
    def _shrink_kernel(  # type: ignore[no-untyped-def]  # Triton reads kernel annotations itself
        x_ptr,
        a_ptr,
        idx_ptr,
        t_ptr,
        count_ptr,
        n_counts,
        M,
        K,
        R,
        stride_a_bank,
        k_per_split,
        n_bank,
        HAS_IDX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_PDL: tl.constexpr,
        WAIT_AFTER: tl.constexpr = False,
    ):
        if USE_PDL:
            # The main kernel may start now: it reads the codes while this one runs, and
            # waits (``gdc_wait``) before it reads ``t`` or the counters.
            tl.extra.cuda.gdc_launch_dependents()
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        # Zero the main kernel's counters, 1024 per program (the caller sizes the grid).
        c = (pid_m * tl.num_programs(1) + split) * 1024 + tl.arange(0, 1024)
        tl.store(count_ptr + c, tl.zeros((1024,), dtype=tl.int32), mask=c < n_counts)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        if HAS_IDX:
            k_row = tl.load(idx_ptr + m, mask=m_ok, other=-1)
            valid = m_ok & (k_row >= 0) & (k_row < n_bank)
            a_off = tl.where(valid, k_row, 0).to(tl.int64) * stride_a_bank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        k_start = split * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xs = tl.load(
                x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0
            ).to(tl.float32)
            if HAS_IDX:
                a = tl.load(
                    a_ptr + a_off[:, None, None] + r[None, :, None] * K + k[None, None, :],
                    mask=valid[:, None, None] & r_ok[None, :, None] & k_ok[None, None, :],
                    other=0,
                ).to(tl.float32)
                acc += tl.sum(xs[:, None, :] * a, axis=2)
            else:
                a = tl.load(
                    a_ptr + r[:, None] * K + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0
                ).to(tl.float32)
                acc += tl.sum(xs[:, None, :] * a[None, :, :], axis=2)
        tl.store(t_ptr + (split * M + m[:, None]) * BLOCK_R + r[None, :], acc, mask=m_ok[:, None])
        if WAIT_AFTER:
            # Launched beside the Gluon kernel (programmatic dependent launch): finish only
            # after it, so that a kernel waiting for this one sees its partials too.
            tl.extra.cuda.gdc_wait()

    @triton.jit  # type: ignore[untyped-decorator]
    def _bank_shrink_kernel(  # type: ignore[no-untyped-def]
        x_ptr, a_ptr, idx_ptr, t_ptr, count_ptr, n_counts, K, R, stride_a_bank, n_bank,
        R_PER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        USE_PDL: tl.constexpr, HAS_IDX: tl.constexpr = True,
    ):  # fmt: skip
        # The shrink of a bank read by many rows: a program per row and R_PER rows of its
        # adapter's A, each a contiguous run of ``in`` floats, over the whole of K: ``t`` is
        # whole (no partials to add), and every program reads its bytes in long runs.
        # Without an index (HAS_IDX off), every row reads the one adapter (A is (r, in)).
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        part = tl.program_id(1)
        # Zeroes n_counts counters, 1024 a program (0 where no kernel after it counts).
        c = (row * tl.num_programs(1) + part) * 1024 + tl.arange(0, 1024)
        tl.store(count_ptr + c, tl.zeros((1024,), dtype=tl.int32), mask=c < n_counts)
        if HAS_IDX:
            k_row = tl.load(idx_ptr + row)
            valid = (k_row >= 0) & (k_row < n_bank)
        else:
            k_row = row * 0
            valid = k_row == 0
        r = part * R_PER + tl.arange(0, R_PER)
        r_ok = (r < R) & valid
        a_row = a_ptr + tl.where(valid, k_row, 0).to(tl.int64) * stride_a_bank
        acc = tl.zeros((R_PER, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xs = tl.load(x_ptr + row * K + k, mask=k_ok, other=0).to(tl.float32)
            a = tl.load(
                a_row + r[:, None] * K + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0
            ).to(tl.float32)
            acc += a * xs[None, :]
        tl.store(t_ptr + row * BLOCK_R + r, tl.sum(acc, axis=1), mask=r < R)

    @triton.jit  # type: ignore[untyped-decorator]
    def _bank_terms_kernel(  # type: ignore[no-untyped-def]
        t_ptr, b_ptr, idx_ptr, scaling_ptr, lt_ptr, M, N, R, stride_b_bank, n_bank,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):  # fmt: skip
        # ``lt[i] = s_k · t[i] @ B[k_i]ᵀ`` (float32) for a tile of BLOCK_N outputs and
        # BLOCK_M rows, each row reading its own adapter's tile of B; rows that read no
        # adapter give 0. ``t`` is _bank_shrink_kernel's (whole, BLOCK_R floats a row): B
        # is loaded before waiting for it (programmatic dependent launch).
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        k = tl.load(idx_ptr + m, mask=m_ok, other=-1)
        use = m_ok & (k >= 0) & (k < n_bank)
        k = tl.where(use, k, 0).to(tl.int64)
        b = tl.load(
            b_ptr + k[:, None, None] * stride_b_bank + n[None, :, None] * R + r[None, None, :],
            mask=use[:, None, None] & n_ok[None, :, None] & r_ok[None, None, :],
            other=0,
        ).to(tl.float32)  # (BLOCK_M, BLOCK_N, BLOCK_R)
        s_k = tl.load(scaling_ptr + k, mask=use, other=0).to(tl.float32)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        t = tl.load(
            t_ptr + m[:, None] * BLOCK_R + r[None, :], mask=use[:, None] & r_ok[None, :], other=0
        )
        terms = tl.sum(b * (t * s_k[:, None])[:, None, :], axis=2)  # (BLOCK_M, BLOCK_N)
        tl.store(lt_ptr + m[:, None] * N + n[None, :], terms, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit  # type: ignore[untyped-decorator]
    def _step_codes(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, step, m, m_ok, pj, n_ok, K, BLOCK_K: tl.constexpr,
        X_ROWS: tl.constexpr,
    ):  # fmt: skip
        # One K step's ``x`` (rows × BLOCK_K, or BLOCK_K at one row) and packed codes
        # (NB × BLOCK_K bytes), as stored: a prefetched step holds few registers.
        k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        if X_ROWS:
            xs = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None], other=0)
        else:
            xs = tl.load(x_ptr + k)
        packed = tl.load(
            packed_ptr + pj[:, None] * K + k[None, :],
            mask=n_ok[:, None],
            other=0,
            eviction_policy="evict_first",
        )
        return xs, packed

    @triton.jit  # type: ignore[untyped-decorator]
    def _step_meta(  # type: ignore[no-untyped-def]
        scale_ptr, zero_ptr, step, n, n_ok, groups_per_row, BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr, GPS: tl.constexpr, META: tl.constexpr,
    ):  # fmt: skip
        # One K step's zero and scale, as stored: per output (META 0), per output and
        # group (1), or per output and input (2).
        if META == 0:
            meta = n * groups_per_row + step
            ok = n_ok
        elif META == 1:
            meta = n[:, None] * groups_per_row + step * GPS + tl.arange(0, GPS)[None, :]
            ok = n_ok[:, None]
        else:
            g = step * GPS + tl.arange(0, BLOCK_K) // GROUP
            meta = n[:, None] * groups_per_row + g[None, :]
            ok = n_ok[:, None]
        z = tl.load(zero_ptr + meta, mask=ok, other=0)
        s = tl.load(scale_ptr + meta, mask=ok, other=0)
        return z, s

    @triton.jit  # type: ignore[untyped-decorator]
    def _first_ahead(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, scale_ptr, zero_ptr, first, m, m_ok, pj, n, n_ok, K, groups_per_row,
        BLOCK_K: tl.constexpr, GROUP: tl.constexpr, GPS: tl.constexpr, X_ROWS: tl.constexpr,
        META: tl.constexpr, PREFETCH: tl.constexpr,
    ):  # fmt: skip
        # What a K loop loads a step early, for its first step (0 in the places PREFETCH
        # leaves to the step itself): x and codes (PREFETCH 2), zero and scale (1 and 2).
        ahead_x, ahead_p, ahead_z, ahead_s = 0, 0, 0, 0
        if PREFETCH >= 2:
            ahead_x, ahead_p = _step_codes(
                x_ptr, packed_ptr, first, m, m_ok, pj, n_ok, K, BLOCK_K, X_ROWS
            )
        if PREFETCH >= 1:
            ahead_z, ahead_s = _step_meta(
                scale_ptr, zero_ptr, first, n, n_ok, groups_per_row, BLOCK_K, GROUP, GPS, META
            )
        return ahead_x, ahead_p, ahead_z, ahead_s

    @triton.jit  # type: ignore[untyped-decorator]
    def _step_tiles(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, scale_ptr, zero_ptr, step, last_step, ahead, m, m_ok, pj, n, n_ok,
        K, groups_per_row, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, GPS: tl.constexpr,
        X_ROWS: tl.constexpr, META: tl.constexpr, PREFETCH: tl.constexpr,
    ):  # fmt: skip
        # This K step's x, codes, zero and scale, and what the next step takes from ``ahead``:
        # the tiles PREFETCH loads a step early come from ``ahead`` and are loaded again for
        # the next step (the last step loads itself again: no bounds to check), the rest now.
        ahead_x, ahead_p, ahead_z, ahead_s = ahead
        step_n = tl.minimum(step + 1, last_step)
        if PREFETCH >= 2:
            xs, packed = ahead_x, ahead_p
            ahead_x, ahead_p = _step_codes(
                x_ptr, packed_ptr, step_n, m, m_ok, pj, n_ok, K, BLOCK_K, X_ROWS
            )
        else:
            xs, packed = _step_codes(x_ptr, packed_ptr, step, m, m_ok, pj, n_ok, K, BLOCK_K, X_ROWS)
        if PREFETCH >= 1:
            z, s = ahead_z, ahead_s
            ahead_z, ahead_s = _step_meta(
                scale_ptr, zero_ptr, step_n, n, n_ok, groups_per_row, BLOCK_K, GROUP, GPS, META
            )
        else:
            z, s = _step_meta(
                scale_ptr, zero_ptr, step, n, n_ok, groups_per_row, BLOCK_K, GROUP, GPS, META
            )
        return xs, packed, z, s, (ahead_x, ahead_p, ahead_z, ahead_s)

    @triton.jit  # type: ignore[untyped-decorator]
    def _add_slices(total, ptr, slice_rows, m, n, ok, N, SLICES: tl.constexpr):  # type: ignore[no-untyped-def]
        # ``total`` plus ``SLICES`` float32 slices of (slice_rows, N), rows m, columns n,
        # in order, read from L2 (other programs or other threads wrote them).
        for s_i in tl.static_range(SLICES):
            total += tl.load(
                ptr + (s_i * slice_rows + m[:, None]) * N + n[None, :],
                mask=ok,
                other=0,
                cache_modifier=".cg",
            )
        return total

    @triton.jit  # type: ignore[untyped-decorator]
    def _one_adapter_terms(  # type: ignore[no-untyped-def]
        rows, mine, use, k, t_ptr, b_ptr, scaling_ptr, lt_ptr, M, N, R, t_splits, stride_b_bank,
        n, n_ok, BLOCK_R: tl.constexpr, T_SPLITS: tl.constexpr, STORE: tl.constexpr,
    ):  # fmt: skip
        # ``s_k · t[rows] @ B[k]ᵀ`` for rows that all read adapter k (rows that read none
        # give 0; only ``mine`` are stored, with STORE): the column tile of B once, a
        # float32-grade dot (TF32 three times). Returned (rows, NB) as well.
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        ts = tl.arange(0, T_SPLITS)
        t_part = tl.load(
            t_ptr + (ts[None, :, None] * M + rows[:, None, None]) * BLOCK_R + r[None, None, :],
            mask=use[:, None, None] & (ts[None, :, None] < t_splits) & r_ok[None, None, :],
            other=0,
        )
        t_rows = tl.sum(t_part, axis=1) * tl.load(scaling_ptr + k).to(tl.float32)
        b = tl.load(
            b_ptr + k * stride_b_bank + n[:, None] * R + r[None, :],
            mask=n_ok[:, None] & r_ok[None, :],
            other=0,
        ).to(tl.float32)
        terms = tl.dot(t_rows, tl.trans(b), input_precision="tf32x3")  # (rows, NB)
        # Rows without an adapter get 0, not 0 · B: a NaN or inf in B or s_k stays its own.
        terms = tl.where(use[:, None], terms, 0.0)
        if STORE:
            tl.store(
                lt_ptr + rows[:, None] * N + n[None, :],
                terms,
                mask=mine[:, None] & n_ok[None, :],
            )
        return terms

    @triton.jit  # type: ignore[untyped-decorator]
    def _gathered_terms(  # type: ignore[no-untyped-def]
        first, count, idx_ptr, t_ptr, b_ptr, scaling_ptr, lt_ptr, M, N, R, t_splits,
        stride_b_bank, n_bank, n, n_ok, HAS_IDX: tl.constexpr, BLOCK_R: tl.constexpr,
        T_SPLITS: tl.constexpr, TERM_ROWS: tl.constexpr,
    ):  # fmt: skip
        # ``s_k · t[i] @ B[k_i]ᵀ`` for rows ``first .. first + count``, TERM_ROWS at a
        # time, each row reading the column tile of its own B (one gathered load, no
        # branch); rows that read no adapter give 0.
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        i = tl.arange(0, TERM_ROWS)
        ts = tl.arange(0, T_SPLITS)
        for c0 in range(0, count, TERM_ROWS):
            rows = first + c0 + i
            mine = (c0 + i < count) & (rows < M)
            if HAS_IDX:  # noqa: SIM108 - Triton wants a plain branch on a constexpr
                k_i = tl.load(idx_ptr + rows, mask=mine, other=-1)
            else:
                k_i = tl.where(mine, 0, -1)
            use = mine & (k_i >= 0) & (k_i < n_bank)
            k_safe = tl.where(use, k_i, 0).to(tl.int64)
            t_part = tl.load(
                t_ptr + (ts[None, :, None] * M + rows[:, None, None]) * BLOCK_R + r[None, None, :],
                mask=use[:, None, None] & (ts[None, :, None] < t_splits) & r_ok[None, None, :],
                other=0,
            )
            s_k = tl.load(scaling_ptr + k_safe, mask=use, other=0).to(tl.float32)
            t_rows = tl.sum(t_part, axis=1) * s_k[:, None]  # (TERM_ROWS, BLOCK_R)
            b = tl.load(
                b_ptr
                + k_safe[:, None, None] * stride_b_bank
                + n[None, :, None] * R
                + r[None, None, :],
                mask=use[:, None, None] & n_ok[None, :, None] & r_ok[None, None, :],
                other=0,
            ).to(tl.float32)
            terms = tl.sum(b * t_rows[:, None, :], axis=2)  # (TERM_ROWS, NB)
            tl.store(
                lt_ptr + rows[:, None] * N + n[None, :], terms, mask=mine[:, None] & n_ok[None, :]
            )

    @triton.jit  # type: ignore[untyped-decorator]
    def _main_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        t_ptr,
        b_ptr,
        idx_ptr,
        scaling_ptr,
        mag_ptr,
        norm_ptr,
        is_dora_ptr,
        bias_ptr,
        ws_ptr,
        lt_ptr,
        count_ptr,
        out_ptr,
        M,
        N,
        K,
        rows_per_slot,
        R,
        t_splits,
        steps_per_split,
        stride_b_bank,
        stride_dora_bank,
        n_bank,
        BITS: tl.constexpr,
        PER: tl.constexpr,
        GROUP: tl.constexpr,
        GPS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_R: tl.constexpr,
        SPLIT_K: tl.constexpr,
        ROWS_PER_SPLIT: tl.constexpr,
        TERM_ROWS: tl.constexpr,
        DOT_ROWS: tl.constexpr,
        T_SPLITS: tl.constexpr,
        HAS_LORA: tl.constexpr,
        HAS_IDX: tl.constexpr,
        HAS_DORA: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        MODE: tl.constexpr,
        BASE_SPLITS: tl.constexpr,
        GATHER_EARLY: tl.constexpr,
        PREFETCH: tl.constexpr,
        MAGIC: tl.constexpr,
        OFFSET: tl.constexpr,
        USE_PDL: tl.constexpr,
        TERMS_READY: tl.constexpr = False,
    ):
        # MODE 0: a tile holds every slot of its packed rows (one read of each byte),
        # multiplied on tensor cores; MODE 1: a program per (tile, slot), so no register
        # reshape (the slots' programs reread the bytes from L2); MODE 2: one row of x,
        # on CUDA cores (a GEMV), every slot of the tile.
        NB: tl.constexpr = BLOCK_P if MODE == 1 else PER * BLOCK_P
        BLOCK_K: tl.constexpr = GPS * GROUP
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        if MODE == 1:
            tile = pid_n // PER
            slot1 = pid_n % PER
        else:
            tile = pid_n
            slot1 = 0
        p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < rows_per_slot
        slot = tl.arange(0, PER)
        shifts = BITS * (PER - 1 - slot)
        if MODE >= 3:
            # Output j of the tile is packed row pj of slot j // BLOCK_P: each byte is
            # loaded once per slot (the repeats hit L1), no register reshape.
            j = tl.arange(0, NB)
            pj = tile * BLOCK_P + j % BLOCK_P
            sh = BITS * (PER - 1 - j // BLOCK_P)
            n = (j // BLOCK_P) * rows_per_slot + pj
            n_ok = pj < rows_per_slot
        elif MODE == 1:
            n = slot1 * rows_per_slot + p
            n_ok = p_ok
        else:
            # Output row of (slot, packed row): slot · rows_per_slot + packed row.
            n = tl.reshape(slot[:, None] * rows_per_slot + p[None, :], (NB,))
            n_ok = tl.reshape(tl.broadcast_to(p_ok[None, :], (PER, BLOCK_P)), (NB,))
        if MODE == 8:
            # A program per tile and block of ROWS_PER_SPLIT rows: it finishes its rows
            # (no counter, no other program's partials).
            m = split * ROWS_PER_SPLIT + tl.arange(0, BLOCK_M)
            m_ok = (tl.arange(0, BLOCK_M) < ROWS_PER_SPLIT) & (m < M)
        else:
            m = tl.arange(0, BLOCK_M)
            m_ok = m < M
        groups_per_row = K // GROUP
        first = split * steps_per_split
        if MODE == 2:
            n2 = slot[:, None] * rows_per_slot + p[None, :]  # (PER, BLOCK_P)
            acc2 = tl.zeros((PER, BLOCK_P), dtype=tl.float32)
            for step in range(first, first + steps_per_split):
                k = step * BLOCK_K + tl.arange(0, BLOCK_K)
                packed = tl.load(
                    packed_ptr + p[:, None] * K + k[None, :],
                    mask=p_ok[:, None],
                    other=0,
                    eviction_policy="evict_first",
                ).to(tl.int32)
                codes = ((packed[None, :, :] >> shifts[:, None, None]) & ((1 << BITS) - 1)).to(
                    tl.float32
                )
                xv = tl.load(x_ptr + k).to(tl.float32)
                prod = tl.reshape(codes * xv[None, None, :], (PER, BLOCK_P, GPS, GROUP))
                d = tl.sum(prod, axis=3)  # (PER, BLOCK_P, GPS)
                x_sum = tl.sum(tl.reshape(xv, (GPS, GROUP)), axis=1)  # (GPS,)
                g = step * GPS + tl.arange(0, GPS)
                meta = n2[:, :, None] * groups_per_row + g[None, None, :]
                ok = p_ok[None, :, None]
                z = tl.load(zero_ptr + meta, mask=ok, other=0).to(tl.float32)
                s = tl.load(scale_ptr + meta, mask=ok, other=0).to(tl.float32)
                acc2 += tl.sum((d - x_sum[None, None, :] * z) * s, axis=2)
            acc = tl.reshape(acc2, (BLOCK_M, NB))
        elif MODE == 4:
            # One row of x on CUDA cores; codes to float32 by the exponent trick
            # (``0x4B000000 | q`` is ``2²³ + q``), exact, no int-to-float conversion.
            acc4 = tl.zeros((NB,), dtype=tl.float32)
            meta4: tl.constexpr = 0 if GPS == 1 else 1
            last_step = first + steps_per_split - 1
            ahead = _first_ahead(
                x_ptr, packed_ptr, scale_ptr, zero_ptr, first, m, m_ok, pj, n, n_ok, K,
                groups_per_row, BLOCK_K, GROUP, GPS, False, meta4, PREFETCH,
            )  # fmt: skip
            for step in range(first, first + steps_per_split):
                xv, packed, z, s, ahead = _step_tiles(
                    x_ptr, packed_ptr, scale_ptr, zero_ptr, step, last_step, ahead, m, m_ok, pj,
                    n, n_ok, K, groups_per_row, BLOCK_K, GROUP, GPS, False, meta4, PREFETCH,
                )  # fmt: skip
                c = ((packed.to(tl.int32) >> sh[:, None]) & MASK) | 0x4B000000
                cf = c.to(tl.float32, bitcast=True) - 8388608.0
                xv = xv.to(tl.float32)
                z = z.to(tl.float32)
                s = s.to(tl.float32)
                if GPS == 1:
                    d1 = tl.sum(cf * xv[None, :], axis=1)
                    x_sum1 = tl.sum(xv, axis=0)
                    acc4 += (d1 - x_sum1 * z) * s
                else:
                    d = tl.sum(tl.reshape(cf * xv[None, :], (NB, GPS, GROUP)), axis=2)
                    x_sum = tl.sum(tl.reshape(xv, (GPS, GROUP)), axis=1)
                    acc4 += tl.sum((d - x_sum[None, :] * z) * s, axis=1)
            acc = tl.reshape(acc4, (BLOCK_M, NB))
        elif MODE == 5:
            # MODE 3 with the operands swapped, ``codes @ xᵀ``: the codes (in registers)
            # are the wide operand and the few rows of x the narrow one, one group a step.
            acc5 = tl.zeros((NB, BLOCK_M), dtype=tl.float32)
            last_step = first + steps_per_split - 1
            ahead = _first_ahead(
                x_ptr, packed_ptr, scale_ptr, zero_ptr, first, m, m_ok, pj, n, n_ok, K,
                groups_per_row, BLOCK_K, GROUP, 1, True, 0, PREFETCH,
            )  # fmt: skip
            for step in range(first, first + steps_per_split):
                xs, packed, z, s, ahead = _step_tiles(
                    x_ptr, packed_ptr, scale_ptr, zero_ptr, step, last_step, ahead, m, m_ok, pj,
                    n, n_ok, K, groups_per_row, BLOCK_K, GROUP, 1, True, 0, PREFETCH,
                )  # fmt: skip
                c = (packed.to(tl.int32) >> sh[:, None]) & MASK
                if MAGIC != 0:
                    # ``OFFSET + q`` by the exponent trick, minus OFFSET: ``q``, exact.
                    codes = (c | MAGIC).to(tl.int16).to(xs.dtype, bitcast=True) - OFFSET
                else:
                    codes = c.to(xs.dtype)
                d5 = tl.dot(codes, tl.trans(xs))  # (NB, BLOCK_M), float32
                x_sum = tl.sum(xs.to(tl.float32), axis=1)
                zf = z.to(tl.float32)
                acc5 += (d5 - zf[:, None] * x_sum[None, :]) * s.to(tl.float32)[:, None]
            acc = tl.trans(acc5)
        elif MODE == 6 or MODE == 7:
            # HQQ's own weights, dequantized in registers: ``(q − z)`` rounded to the
            # compute dtype, times ``s`` rounded (as HQQ's dense path and _triton.py do),
            # then ``w @ xᵀ`` on tensor cores, GPS groups a step, no per-group rescale.
            # MODE 6 subtracts in float32 (codes by the float32 exponent trick), MODE 7 in
            # the compute dtype, two weights an instruction (codes by MODE 5's trick): the
            # same bits for a zero in the compute dtype. q (at most 8 bits) and z (8 or 11)
            # differ exactly in float32 unless |z| is tiny or huge, and then the float32
            # rounding never lands on a midpoint of the compute dtype (checked for every
            # q in 0..255 and every finite bf16 and fp16 z).
            acc6 = tl.zeros((NB, BLOCK_M), dtype=tl.float32)
            meta6: tl.constexpr = 0 if GPS == 1 else 2
            last_step = first + steps_per_split - 1
            ahead = _first_ahead(
                x_ptr, packed_ptr, scale_ptr, zero_ptr, first, m, m_ok, pj, n, n_ok, K,
                groups_per_row, BLOCK_K, GROUP, GPS, True, meta6, PREFETCH,
            )  # fmt: skip
            for step in range(first, first + steps_per_split):
                xs, packed, z, s, ahead = _step_tiles(
                    x_ptr, packed_ptr, scale_ptr, zero_ptr, step, last_step, ahead, m, m_ok, pj,
                    n, n_ok, K, groups_per_row, BLOCK_K, GROUP, GPS, True, meta6, PREFETCH,
                )  # fmt: skip
                if MODE == 7:
                    c = (packed.to(tl.int32) >> sh[:, None]) & MASK  # q, as MODE 5
                    if MAGIC != 0:
                        q = (c | MAGIC).to(tl.int16).to(xs.dtype, bitcast=True) - OFFSET
                    else:
                        q = c.to(xs.dtype)
                    if GPS == 1:
                        w = (q - z[:, None].to(xs.dtype)) * s[:, None].to(xs.dtype)
                    else:
                        w = (q - z.to(xs.dtype)) * s.to(xs.dtype)
                else:
                    c = ((packed.to(tl.int32) >> sh[:, None]) & MASK) | 0x4B000000
                    cf = c.to(tl.float32, bitcast=True) - 8388608.0  # q, exact
                    if GPS == 1:
                        w = (cf - z.to(tl.float32)[:, None]).to(xs.dtype) * s[:, None].to(xs.dtype)
                    else:
                        w = (cf - z.to(tl.float32)).to(xs.dtype) * s.to(xs.dtype)
                acc6 = tl.dot(w, tl.trans(xs), acc6)  # (NB, BLOCK_M), float32
            acc = tl.trans(acc6)
        elif MODE == 8:
            # The base term is the Gluon kernel's (``_gluon``): its BASE_SPLITS partials
            # in ``ws``, added up by the last program below.
            acc = tl.zeros((BLOCK_M, NB), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, NB), dtype=tl.float32)
            for step in range(first, first + steps_per_split):
                k = step * BLOCK_K + tl.arange(0, BLOCK_K)
                xs = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None], other=0)
                if MODE == 3:
                    packed = tl.load(
                        packed_ptr + pj[:, None] * K + k[None, :],
                        mask=n_ok[:, None],
                        other=0,
                        eviction_policy="evict_first",
                    ).to(tl.int32)
                    c = (packed >> sh[:, None]) & MASK
                    if MAGIC != 0:
                        # ``MAGIC | q`` read as bf16/fp16 is ``OFFSET + q``, exact: no
                        # int-to-float conversion; minus OFFSET it is ``q``, exact.
                        codes = (c | MAGIC).to(tl.int16).to(xs.dtype, bitcast=True) - OFFSET
                    else:
                        codes = c.to(xs.dtype)
                else:
                    packed = tl.load(
                        packed_ptr + p[:, None] * K + k[None, :],
                        mask=p_ok[:, None],
                        other=0,
                        eviction_policy="evict_first",
                    ).to(tl.int32)
                    if MODE == 1:
                        shift1 = BITS * (PER - 1 - slot1)
                        codes = ((packed >> shift1) & MASK).to(xs.dtype)
                    else:
                        codes = (packed[None, :, :] >> shifts[:, None, None]) & MASK
                        codes = tl.reshape(codes, (NB, BLOCK_K)).to(xs.dtype)
                if GPS == 1:
                    d = tl.dot(xs, tl.trans(codes))  # (BLOCK_M, NB), float32
                    x_sum = tl.sum(xs.to(tl.float32), axis=1)
                    meta = n * groups_per_row + step
                    z = tl.load(zero_ptr + meta, mask=n_ok, other=0).to(tl.float32)
                    s = tl.load(scale_ptr + meta, mask=n_ok, other=0).to(tl.float32)
                    acc += (d - x_sum[:, None] * z[None, :]) * s[None, :]
                else:
                    x3 = tl.permute(tl.reshape(xs, (BLOCK_M, GPS, GROUP)), (1, 0, 2))
                    c3 = tl.permute(tl.reshape(codes, (NB, GPS, GROUP)), (1, 2, 0))
                    d3 = tl.dot(x3, c3)  # (GPS, BLOCK_M, NB)
                    x_sum = tl.sum(x3.to(tl.float32), axis=2)  # (GPS, BLOCK_M)
                    g = step * GPS + tl.arange(0, GPS)
                    meta = n[None, :] * groups_per_row + g[:, None]  # (GPS, NB)
                    z = tl.load(zero_ptr + meta, mask=n_ok[None, :], other=0).to(tl.float32)
                    s = tl.load(scale_ptr + meta, mask=n_ok[None, :], other=0).to(tl.float32)
                    acc += tl.sum((d3 - x_sum[:, :, None] * z[:, None, :]) * s[:, None, :], axis=0)

        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        if MODE == 8 and GATHER_EARLY and not TERMS_READY:
            # Rows of a bank's several adapters: each row's column tile of its own B, read
            # before waiting for the kernels before this one (B is the caller's, so these
            # reads may overlap the Gluon kernel's K loop); the dot waits for ``t``.
            if HAS_IDX:
                k_early = tl.load(idx_ptr + m, mask=m_ok, other=-1)
            else:
                k_early = tl.where(m_ok, 0, -1)
            use_early = m_ok & (k_early >= 0) & (k_early < n_bank)
            k_early = tl.where(use_early, k_early, 0).to(tl.int64)
            b_early = tl.load(
                b_ptr
                + k_early[:, None, None] * stride_b_bank
                + n[None, :, None] * R
                + r[None, None, :],
                mask=use_early[:, None, None] & n_ok[None, :, None] & r_ok[None, None, :],
                other=0,
            ).to(tl.float32)  # (BLOCK_M, NB, BLOCK_R)
        if USE_PDL:
            # Launched early (programmatic dependent launch): wait for the shrink kernel's
            # ``t`` and zeroed counters before reading either.
            tl.extra.cuda.gdc_wait()
        if HAS_IDX:  # noqa: SIM108 - Triton wants a plain branch on a constexpr
            k_rows = tl.load(idx_ptr + m, mask=m_ok, other=-1)
        else:
            k_rows = tl.where(m_ok, 0, -1)
        if MODE == 8:
            # The Gluon kernel's partials of this program's rows, loaded before the adapter
            # terms so that their reads overlap.
            base_sum = _add_slices(
                tl.zeros((BLOCK_M, NB), dtype=tl.float32), ws_ptr, M, m, n,
                m_ok[:, None] & n_ok[None, :], N, BASE_SPLITS,
            )  # fmt: skip
        # MODE 8 keeps one adapter's terms of its (at most DOT_ROWS) rows in registers
        # (``own``); terms gathered from several adapters go through ``lt`` (``n_lt``).
        own = tl.zeros((DOT_ROWS if DOT_ROWS > 0 else 1, NB), dtype=tl.float32)
        n_lt = 0
        if HAS_LORA and BLOCK_M == 1:
            # One token (the GEMVs): split 0's adapter term, reading the column tile of
            # B, added to its partial (measured faster than the stored-apart term here,
            # and slower at 16 rows).
            k_row = tl.sum(tl.where(m == split, k_rows, 0))
            if (split < M) & (k_row >= 0) & (k_row < n_bank):
                ts = tl.arange(0, T_SPLITS)
                t_part = tl.load(
                    t_ptr + (ts[:, None] * M + split) * BLOCK_R + r[None, :],
                    mask=(ts[:, None] < t_splits) & r_ok[None, :],
                    other=0,
                )
                t_row = tl.sum(t_part, axis=0) * tl.load(scaling_ptr + k_row).to(tl.float32)
                b = tl.load(
                    b_ptr + k_row.to(tl.int64) * stride_b_bank + n[:, None] * R + r[None, :],
                    mask=n_ok[:, None] & r_ok[None, :],
                    other=0,
                ).to(tl.float32)
                term = tl.sum(b * t_row[None, :], axis=1)  # (NB,)
                acc += tl.where(m[:, None] == split, term[None, :], 0.0)
        elif HAS_LORA and MODE == 8 and GATHER_EARLY and TERMS_READY:
            # _bank_terms_kernel's terms of these rows (``lt``), as this kernel's own below.
            own = tl.load(
                lt_ptr + m[:, None] * N + n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0
            )
        elif HAS_LORA and MODE == 8 and GATHER_EARLY:
            ts = tl.arange(0, T_SPLITS)
            t_part = tl.load(
                t_ptr + (ts[None, :, None] * M + m[:, None, None]) * BLOCK_R + r[None, None, :],
                mask=use_early[:, None, None]
                & (ts[None, :, None] < t_splits)
                & r_ok[None, None, :],
                other=0,
            )
            s_early = tl.load(scaling_ptr + k_early, mask=use_early, other=0).to(tl.float32)
            t_rows = tl.sum(t_part, axis=1) * s_early[:, None]  # (BLOCK_M, BLOCK_R)
            own = tl.sum(b_early * t_rows[:, None, :], axis=2)  # (BLOCK_M, NB)
        elif HAS_LORA:
            # This split's share of the rows: their adapter terms, stored apart (``lt``) for
            # the last split to add. DOT_ROWS rows at a time that share one adapter (or
            # none) read its column tile of B once and multiply on tensor cores; rows of
            # several adapters read each row's own tile, TERM_ROWS at a time.
            if DOT_ROWS > 0:
                d = tl.arange(0, DOT_ROWS)
                for c0 in range(0, ROWS_PER_SPLIT, DOT_ROWS):
                    rows = split * ROWS_PER_SPLIT + c0 + d
                    mine = (c0 + d < ROWS_PER_SPLIT) & (rows < M)
                    if HAS_IDX:
                        k_d = tl.load(idx_ptr + rows, mask=mine, other=-1).to(tl.int64)
                    else:
                        k_d = tl.where(mine, 0, -1).to(tl.int64)
                    use = mine & (k_d >= 0) & (k_d < n_bank)
                    k_lo = tl.min(tl.where(use, k_d, n_bank), axis=0)
                    k_hi = tl.max(tl.where(use, k_d, -1), axis=0)
                    if k_lo >= k_hi:  # one adapter (k_hi) or none (no row uses one)
                        own = _one_adapter_terms(
                            rows, mine, use, tl.maximum(k_hi, 0), t_ptr, b_ptr, scaling_ptr, lt_ptr,
                            M, N, R, t_splits, stride_b_bank, n, n_ok, BLOCK_R, T_SPLITS,
                            MODE != 8,
                        )  # fmt: skip
                    else:
                        _gathered_terms(
                            split * ROWS_PER_SPLIT + c0, tl.minimum(DOT_ROWS, ROWS_PER_SPLIT - c0),
                            idx_ptr, t_ptr, b_ptr, scaling_ptr, lt_ptr, M, N, R, t_splits,
                            stride_b_bank, n_bank, n, n_ok, HAS_IDX, BLOCK_R, T_SPLITS, TERM_ROWS,
                        )  # fmt: skip
                        n_lt += 1
            else:
                n_lt += 1
                _gathered_terms(
                    split * ROWS_PER_SPLIT, ROWS_PER_SPLIT, idx_ptr, t_ptr, b_ptr, scaling_ptr,
                    lt_ptr, M, N, R, t_splits, stride_b_bank, n_bank, n, n_ok, HAS_IDX, BLOCK_R,
                    T_SPLITS, TERM_ROWS,
                )  # fmt: skip

        if SPLIT_K > 1 and MODE != 8:
            ws = ws_ptr + (split * BLOCK_M + m[:, None]) * N + n[None, :]
            tl.store(ws, acc, mask=m_ok[:, None] & n_ok[None, :])
            # Every thread's partial is stored before the counter is released (one thread
            # does the atomic; its release orders only what it has seen).
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            last = done == SPLIT_K - 1
        else:
            last = True
        if last:
            if MODE == 8:
                total = acc + base_sum  # acc is 0 here
            elif SPLIT_K > 1:
                total = _add_slices(
                    tl.zeros((BLOCK_M, NB), dtype=tl.float32), ws_ptr, BLOCK_M, m, n,
                    m_ok[:, None] & n_ok[None, :], N, SPLIT_K,
                )  # fmt: skip
            else:
                total = acc
            if HAS_LORA and BLOCK_M > 1 and MODE == 8:
                if DOT_ROWS > 0 or GATHER_EARLY:
                    total += own
                if n_lt > 0:
                    tl.debug_barrier()  # this program's own ``lt`` stores, by other threads
                    total = _add_slices(total, lt_ptr, 0, m, n, m_ok[:, None] & n_ok[None, :], N, 1)
            elif HAS_LORA and BLOCK_M > 1:
                if SPLIT_K == 1:
                    tl.debug_barrier()  # this program's own ``lt`` stores, by other threads
                total = _add_slices(total, lt_ptr, 0, m, n, m_ok[:, None] & n_ok[None, :], N, 1)
            if HAS_DORA:
                # Only rows with an index in [0, n) read the bank (an index outside gives NaN).
                valid = (k_rows >= 0) & (k_rows < n_bank)
                k_safe = tl.where(valid, k_rows, 0).to(tl.int64)
                if HAS_IDX:
                    dora_row = valid & (tl.load(is_dora_ptr + k_safe, mask=m_ok, other=0) != 0)
                else:
                    dora_row = valid
                where = k_safe[:, None] * stride_dora_bank + n[None, :]
                ok = dora_row[:, None] & n_ok[None, :]
                mag = tl.load(mag_ptr + where, mask=ok, other=1).to(tl.float32)
                nrm = tl.load(norm_ptr + where, mask=ok, other=1).to(tl.float32)
                total = total * (mag / nrm)
            if HAS_BIAS:
                total += tl.load(bias_ptr + n, mask=n_ok, other=0).to(tl.float32)[None, :]
            if HAS_IDX:
                # An index outside [-1, n) reads nothing and makes its row NaN: loud, never
                # a plausible wrong row (the kernel cannot raise).
                bad = (k_rows < -1) | (k_rows >= n_bank)
                total = tl.where(bad[:, None], float("nan"), total)
            tl.store(
                out_ptr + m[:, None] * N + n[None, :],
                total.to(out_ptr.dtype.element_ty),
                mask=m_ok[:, None] & n_ok[None, :],
            )
