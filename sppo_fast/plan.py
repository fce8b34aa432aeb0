"""The chunk plan of the linear path, made once per call: which rows carry loss (valid rows only), how
they group into chunks, and whether the loss and every gradient are computed in the pass that makes
each chunk's logits (one pass: three matmuls) or after a first pass over all chunks (two passes: four).

- "sequences": chunks of whole sequences, so sequence and segment statistics never leave a chunk;
  sequences are grouped greedily by their valid tokens, up to `chunk_size` rows per chunk.
- "tokens": a sequence has more valid tokens than a chunk holds, or is split over the ranks of a context
  group, but each token's loss depends on that token alone (token ratios, no entropy-adaptive clip):
  chunks of valid tokens cut through sequences, and the loss stage sees each token as a sequence of
  one, with weights from the whole mask.
- "two_pass": sequence or segment statistics over sequences longer than a chunk or split over ranks, fp64
  (the eager oracle)
  and traced calls (a data-dependent row count would break the graph: every row, masked ones zeroed).
Padded and packed batches plan alike: the plan sees rows and grid cells only (sppo_fast.layout)."""

from typing import NamedTuple

import torch

from . import dispatch

SEQUENCES, TOKENS, TWO_PASS = "sequences", "tokens", "two_pass"


def default_chunk_size(vocab, hidden=0, rows=0, dtype=torch.float32):
    """Rows per chunk: about 2**24 logits (64 MiB in fp32), at least 256 rows. Each chunk also reads and
    writes the whole (V, H) weight gradient; at V = 151936, H = 512 that update dominated 128-row chunks
    (one step of 1024 tokens: 7.3 s of CPU at 128 rows, 6.4 s at 256, 2-core AMD EPYC).

    A bf16/fp16 head takes all `rows` in one chunk when that holds no more memory than several chunks
    would: several keep a chunk's logits and an fp32 weight-gradient accumulator (4 bytes a weight, copied
    into the weight's dtype a block at a time: chunks.LinearGrads), one chunk its logits and the gradient
    in the weight's dtype (2 bytes), written directly. With 2-byte logits one chunk is the smaller when
    rows <= size + hidden (e.g. 512 tokens at H = 4096: 78 MiB of logits per 76k vocabulary rows against
    1.2 GiB of accumulator)."""
    size = max(256, (1 << 24) // max(vocab, 1))
    if dtype in (torch.bfloat16, torch.float16) and rows <= size + hidden:
        return max(rows, 1)
    return size


class Chunk(NamedTuple):
    rows: torch.Tensor  # (n,) the hidden rows of the chunk
    seqs: tuple  # (a, b): the rows a..b-1 of the loss grid that the chunk's loss stage sees
    cells: torch.Tensor | None  # (n,) where each row lands in that (b - a, T) sub-grid; None: in order


class ChunkPlan(NamedTuple):
    mode: str
    chunk_size: int
    rows: torch.Tensor | None  # (n,) the valid rows, increasing; None: every row (traced calls)
    cells: torch.Tensor | None  # (n,) their cells of the (S, T) grid
    chunks: list  # [Chunk]; one-pass modes only

    def loss_grid(self, inputs, weights):
        """The grid the chunks' loss stage runs on: the batch's own (S, T), or one row per valid token."""
        if self.mode == TOKENS:
            return inputs.cells(self.cells), weights.reshape(-1).index_select(0, self.cells).unsqueeze(1)
        return inputs, weights

    def output_grid(self, x, shape):
        """Values of the loss grid, or one per valid row (two passes), back on the (S, T) grid: 0 where no
        valid token is."""
        if self.mode == SEQUENCES:
            return x
        return x.new_zeros(shape[0] * shape[1]).index_copy(0, self.cells, x.reshape(-1)).view(shape)


def logits_one_pass(logits, config, shard=None, inplace_backward=False, backend=None, requested=None):
    """Whether fused_policy_loss on (N, V) logits takes one pass: its forward also writes the rows'
    d logp / d logits (the basis) and its backward only scales each row by g_logp (ops: the basis op),
    one exp per logit instead of two, at the price of one more sweep of memory (the basis written, then
    read and rewritten). Taken where the backend has that forward (the native one), the logits are 2-byte
    (bf16/fp16, whose two passes are bound by their exps: 1.12-1.28x at bf16 V = 151936 on a 2-core Zen 3
    EPYC; fp32 gained 1.01x there, nothing to bet on CPUs whose exps are cheaper), the loss has no
    gradient through the entropy (entropy_coef 0: the basis is logp's alone), a gradient is wanted, and the
    logits are neither a vocabulary shard (the basis needs the global lse) nor to be overwritten in place,
    nor traced.
    `backend`: the one serving the logits (default: sppo_fast.dispatch's choice, looked up last, never
    while tracing). `requested` (fused_policy_loss's one_pass): False never, True also for fp32 logits or
    an entropy term (correct: the backward then takes the two-pass kernel, the basis unused), where it can run."""
    if requested is False or torch.compiler.is_compiling() or not (logits.requires_grad and torch.is_grad_enabled()):
        return False
    if requested is None and (logits.dtype not in (torch.bfloat16, torch.float16) or config.entropy_coef):
        return False
    if shard is not None or inplace_backward:
        return False
    backend = dispatch.backend_for(logits.device, logits.dtype) if backend is None else backend
    return getattr(backend, "token_logprobs_forward_basis", None) is not None


def plan_linear_loss(layout, valid, *, token_local, oracle, vocab, hidden=0, dtype=torch.float32, chunk_size=None):
    """The plan for a loss over `valid` ((S, T) bool) positions of a batch laid out as `layout`, with a
    (vocab, hidden) head of `dtype`; `oracle`: fp64 inputs, which take the eager reference in two passes."""
    if torch.compiler.is_compiling():
        return ChunkPlan(TWO_PASS, chunk_size or default_chunk_size(vocab), None, None, [])
    rows = layout.to_rows(valid).reshape(-1).nonzero().squeeze(1)
    size = chunk_size or default_chunk_size(vocab, hidden, len(rows), dtype)
    cells = rows if not layout.mapped else layout.cell_of_row.index_select(0, rows)
    if oracle:
        return ChunkPlan(TWO_PASS, size, rows, cells, [])
    counts = valid.sum(1).tolist()
    if max(counts, default=0) <= size and layout.context is None:
        return ChunkPlan(SEQUENCES, size, rows, cells, _sequence_chunks(rows, cells, counts, size, valid.shape[1]))
    if token_local:
        chunks = [Chunk(rows[a:a + size], (a, min(a + size, len(rows))), None) for a in range(0, len(rows), size)]
        return ChunkPlan(TOKENS, size, rows, cells, chunks)
    return ChunkPlan(TWO_PASS, size, rows, cells, [])


def _sequence_chunks(rows, cells, counts, size, width):
    """Whole sequences, greedily grouped while their valid tokens fit in `size` rows."""
    chunks, first_seq, first_row, filled = [], 0, 0, 0

    def close(end_seq):
        end_row = first_row + filled
        local = cells[first_row:end_row] - first_seq * width
        chunks.append(Chunk(rows[first_row:end_row], (first_seq, end_seq), local))

    for s, count in enumerate(counts):
        if filled + count > size:
            close(s)
            first_seq, first_row, filled = s, first_row + filled, 0
        filled += count
    if filled:
        close(len(counts))
    return chunks
