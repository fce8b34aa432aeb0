"""The one chunk loop of the linear path: hidden rows x lm_head a chunk at a time, every chunk's logits
in one shared buffer, and the gradients of hidden, weight and bias accumulated chunk by chunk (on a
vocabulary shard, of this rank's rows of the weight). Every
linear caller (linear_logprobs' forward and backward, the one-pass loss, the gradient accumulation
into `.grad` of the integrations) runs its chunks through `chunk_logits`.

One buffer serves every chunk because on a CPU a fresh tensor of tens of MiB comes from mmap and pays a
page fault per 4 KiB at its first write (about 12 ms per 57 MiB on the 2-core AMD EPYC VM, as much as
the softmax kernels spend on it); reusing one pays that once. (Backing it with huge pages through
madvise was tried: no faster in the median, much slower when the kernel had to compact memory.) On GPU
the caching allocator reuses memory anyway.

The three products (logits, the hidden states' gradient, the weight's) of a bf16/fp16 head run on the
CPU's bf16/fp16 dot-product units where it has them; where it has none, torch's own product of such
operands falls back to ATen's reference gemm, and they run instead on fp32 copies of the operands, a
block of vocabulary rows at a time (see narrow_products_are_slow)."""

import contextlib

import torch


def row_slices(n_rows, chunk_size):
    """Chunks of `chunk_size` consecutive rows covering 0..n_rows-1."""
    return [slice(a, min(a + chunk_size, n_rows)) for a in range(0, n_rows, chunk_size)]


def _length(rows):
    return rows.stop - rows.start if isinstance(rows, slice) else rows.shape[0]


def narrow_products_are_slow(dtype, device):
    """Whether torch's CPU matmul of `dtype` operands lacks a fast kernel here, so that the linear path
    multiplies fp32 copies instead. oneDNN runs bf16 products on AVX512-BF16 or AMX and fp16 ones on
    AMX-FP16 (detected, never assumed); elsewhere ATen's reference gemm serves them: on the 2-core AMD
    EPYC without AVX-512 (Zen 3, AVX2), 256 x 512 by 512 x 151936 took 2.2 s in bf16 (76 ms x 4.75 in
    fp32), and the hidden states' gradient (256 x 151936 by 151936 x 512) 123 s. The fp32 copies are exact
    and the sums were fp32 already, so the results are the same up to the order of the sums."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if dtype == torch.bfloat16:
        return not _cpu_has_bf16_dot()
    return not torch.cpu._is_amx_fp16_supported()


WIDENED_BLOCK_BYTES = 1 << 23  # the fp32 copy of a block of vocabulary rows in a widened product


def _vocab_blocks(weight):
    """Row slices of the weight whose fp32 copies hold about WIDENED_BLOCK_BYTES each (the widened products)."""
    V, H = weight.shape
    return row_slices(V, max(1, WIDENED_BLOCK_BYTES // max(1, 4 * H)))


def logits_into(buffer, h, weight, bias, widen=False):
    """h @ weight.T (+ bias) written into the first len(h) rows of `buffer`, which it returns; with
    `widen` (narrow_products_are_slow), in fp32 a block of vocabulary rows at a time, each rounded once."""
    out = buffer[:h.shape[0]]
    if widen:
        h32 = h.float()
        for cols in _vocab_blocks(weight):
            w32 = weight[cols].float()
            out[:, cols] = torch.mm(h32, w32.T) if bias is None else torch.addmm(bias[cols].float(), h32, w32.T)
        return out
    if bias is None:
        return torch.mm(h, weight.T, out=out)
    return torch.addmm(bias, h, weight.T, out=out)


def hidden_grad(grad_logits, weight, widen=False, out=None):
    """grad_logits (n, V) @ weight (V, H), into `out` if given; with `widen`, the sum over V taken in fp32
    a block of vocabulary rows at a time and rounded once."""
    if not widen:
        return torch.mm(grad_logits, weight, out=out)
    total = torch.zeros((grad_logits.shape[0], weight.shape[1]), dtype=torch.float32, device=weight.device)
    for cols in _vocab_blocks(weight):
        total.addmm_(grad_logits[:, cols].float(), weight[cols].float())
    return total.to(weight.dtype) if out is None else out.copy_(total)


def chunk_logits(hidden, weight, bias, chunks):
    """For each chunk of rows (a slice or an index tensor into hidden's rows), yields (rows, h, logits):
    the chunk's hidden rows (n, H) and their logits (n, V), which the next chunk overwrites."""
    if not chunks:
        return
    buffer = torch.empty((max(_length(r) for r in chunks), weight.shape[0]), dtype=hidden.dtype,
                         device=hidden.device)
    widen = narrow_products_are_slow(weight.dtype, weight.device)
    for rows in chunks:
        h = hidden[rows] if isinstance(rows, slice) else hidden.index_select(0, rows)
        yield rows, h, logits_into(buffer, h, weight, bias, widen)


class LinearGrads:
    """The gradients of hidden, weight and bias of `logits = hidden @ weight.T + bias`, accumulated chunk
    by chunk. By default weight and bias accumulate in fp32 buffers of their own; the weight's is never
    zeroed, the first chunk's matmul writes it (beta=0), which saves a pass over V x H; with
    `single_chunk` they are written in the weight's dtype directly. With `into`
    ((weight_grad, bias_grad), either None to skip it) they are added into those tensors instead (the
    parameters' `.grad`, see integrations.grad_accumulation). Rows no chunk visits get a zero gradient.
    `backend`: the kernel backend serving the call (sppo_fast.dispatch), whose bf16 weight-gradient
    product, if it has one, replaces torch's (see weight_grad_product).

    An fp32 accumulator of a bf16/fp16 head is held as blocks of vocabulary rows, separate tensors of about
    32 MiB: result() frees each block once it is copied into the weight's dtype, so the resident peak is the
    accumulator and one block's copy, not the accumulator and the whole copy (297 + 148 MiB at V = 151936,
    H = 512); untouched pages of the copy's tensor are not resident yet."""

    def __init__(self, hidden, weight, bias, backend, into=None, shard=None, single_chunk=False):
        self.lm_head, self.shard, self.backend = weight, shard, backend
        self.hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        self.into = into is not None
        if self.into:
            weight_grad, self.bias = into
            self.weight_blocks = None if weight_grad is None else [(slice(None), weight_grad)]
        else:
            # one chunk: one matmul, which accumulates in fp32 and rounds once, straight into the weight's
            # dtype (no accumulator; plan.default_chunk_size); several: an fp32 accumulator
            wide = weight.dtype if single_chunk else torch.promote_types(weight.dtype, torch.float32)
            self.weight_blocks = [(rows, torch.empty((rows.stop - rows.start, weight.shape[1]), dtype=wide,
                                                     device=weight.device))
                                  for rows in _accumulator_blocks(weight, wide)]
            self.bias = None if bias is None else torch.zeros(bias.shape, dtype=wide, device=bias.device)
        self.chunks = 0
        self._wide = None
        first = None if self.weight_blocks is None else self.weight_blocks[0][1]
        self._product = weight_grad_product(backend, weight, first)
        self._widen = narrow_products_are_slow(weight.dtype, weight.device)

    def add_chunk(self, grad_logits, h, rows):
        """grad_logits (n, V) of the chunk whose hidden rows are `rows` (a slice or index tensor), h (n, H)."""
        if isinstance(rows, slice):
            hidden_grad(grad_logits, self.lm_head, self._widen, out=self.hidden[rows])
        else:
            self.hidden.index_copy_(0, rows, hidden_grad(grad_logits, self.lm_head, self._widen))
        beta = 1 if self.chunks or self.into else 0
        for vocab_rows, block in self.weight_blocks or ():
            grad_block = grad_logits[:, vocab_rows]
            if self._product is not None:
                self._product(block, grad_block, h, bool(beta))
            else:
                self._add_weight_grad(block, grad_block, h, beta)
        if self.bias is not None:
            self.bias += grad_logits.sum(0, dtype=torch.float32).to(self.bias.dtype)
        self.chunks += 1

    def _add_weight_grad(self, block, grad_block, h, beta):
        """torch's product into a block of the accumulator: fp32 operands for an fp32 one (see bf16_products);
        a bf16/fp16 block (one chunk, or the parameter's own .grad) whose products are slow here
        (narrow_products_are_slow) gets its product in fp32 a block of vocabulary rows at a time."""
        if self._widen and block.dtype != torch.float32:
            h32 = h.float()
            for cols in _vocab_blocks(block):
                product = torch.mm(grad_block[:, cols].float().T, h32)
                if beta:
                    product += block[cols]
                block[cols] = product
            return
        with bf16_products(self.lm_head, block):
            block.addmm_(self._widened(grad_block, block.dtype).T, h.to(block.dtype), beta=beta)

    def _widened(self, grad_block, dtype):
        """grad_block in the accumulator's dtype, copied into one buffer kept across the chunks: a fresh
        (n, V) fp32 tensor per chunk would pay its page faults every time (see the module docstring)."""
        if grad_block.dtype == dtype:
            return grad_block
        n, width = grad_block.shape
        if self._wide is None or self._wide.shape[0] < n or self._wide.shape[1] < width:
            self._wide = torch.empty(grad_block.shape, dtype=dtype, device=grad_block.device)
        return self._wide[:n, :width].copy_(grad_block)

    def result(self):
        """(grad_hidden, grad_weight, grad_bias or None), weight and bias in the weight's dtype. On a
        vocabulary shard (parallel.VocabShard) the hidden states' gradient is summed over its group here,
        once per call; the weight's and the bias' are this rank's rows."""
        self._wide = None  # before the copies below: no chunk-sized buffer under them
        if not self.chunks and not self.into:
            for _, block in self.weight_blocks:
                block.zero_()
        if self.shard is not None:
            self.shard.reduce_grad(self.hidden)
        dtype = self.lm_head.dtype
        return (self.hidden, self._weight_result(dtype), None if self.bias is None else self.bias.to(dtype))

    def _weight_result(self, dtype):
        """The weight gradient in `dtype`: the one block itself when it has that dtype, else the blocks
        copied one at a time, each freed after its copy."""
        if self.weight_blocks is None:
            return None
        if len(self.weight_blocks) == 1 and self.weight_blocks[0][1].dtype == dtype:
            return self.weight_blocks[0][1]
        out = torch.empty(self.lm_head.shape, dtype=dtype, device=self.lm_head.device)
        blocks, self.weight_blocks = self.weight_blocks, None
        while blocks:
            rows, block = blocks.pop(0)
            out[rows].copy_(block)
            del block
        return out


def _accumulator_blocks(weight, dtype, block_bytes=1 << 25):
    """Row slices of the weight for its gradient's accumulator: one when it has the weight's dtype (result()
    hands it over as is) or lives on an accelerator (whose caching allocator keeps freed blocks anyway),
    else blocks of about `block_bytes` (LinearGrads' docstring says why)."""
    V, H = weight.shape
    if dtype == weight.dtype or weight.device.type != "cpu":
        return [slice(0, V)]
    return row_slices(V, max(1, block_bytes // max(1, H * dtype.itemsize))) or [slice(0, 0)]


def weight_grad_product(backend, lm_head, accumulator):
    """The backend's own weight-gradient product, `product(accumulator, grad_logits, h, accumulate)`, where
    it serves this call (csrc/weight_grad_bf16.cpp: a bf16 head, an fp32 accumulator, a CPU with
    AVX512-BF16), else None (torch's addmm). torch has no CPU matmul of bf16 operands into an fp32 output:
    its way, the gradient widened to fp32 and oneDNN at bf16 precision (bf16_products), took 173 ms a chunk
    of 256 tokens at V = 151936, H = 512 on the 2-core AMD EPYC, the backend's 70 ms. Where the CPU has AMX
    tiles, oneDNN's matmul runs on them, several times the AVX512-BF16 rate: torch's way is kept there
    (not measured: no AMX machine was at hand)."""
    product = getattr(backend, "accumulate_weight_grad", None)
    if (product is None or lm_head.dtype != torch.bfloat16 or accumulator is None
            or accumulator.dtype != torch.float32 or accumulator.device.type != "cpu"
            or not accumulator.is_contiguous() or torch.cpu._is_amx_tile_supported()):
        return None
    return product


def bf16_products(lm_head, accumulator):
    """For a bf16 head whose weight gradient accumulates in fp32 on a CPU with bf16 dot products
    (AVX512-BF16 or AMX, detected): lets oneDNN run that fp32 matmul on bf16 units. Its operands are bf16
    values widened to fp32, so narrowing them back is exact and the result is the same sums of exact
    products in fp32, at the bf16 rate (2x and more than fp32 here). Otherwise (another dtype, no such
    units, another device) nothing changes. The flag is process-wide for the matmul's duration."""
    if (lm_head.dtype != torch.bfloat16 or accumulator.dtype != torch.float32 or accumulator.device.type != "cpu"
            or not _cpu_has_bf16_dot()):
        return contextlib.nullcontext()
    return _onednn_fp32_matmul_precision("bf16")


@contextlib.contextmanager
def _onednn_fp32_matmul_precision(precision):
    matmul = torch.backends.mkldnn.matmul
    before, matmul.fp32_precision = matmul.fp32_precision, precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _cpu_has_bf16_dot():
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
