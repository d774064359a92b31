"""Rollout generation with the Hugging Face model being trained (its own weights, no copy): eager prefill,
then a decode loop over a static KV cache, CUDA-graph captured on GPU (a plain loop on CPU).

How a rollout runs (``Generator.generate``):

1. **Prefill** (eager): the prompt goes through the model once, writing every layer's K/V into the
   static cache (:mod:`fastppo.attention`; rows left-aligned, so a token's slot is its position id),
   and the first token is sampled. With flash-attn the prompts are packed without padding (varlen
   kernel); else a left-padded batch with an SDPA mask.
2. **Decode**: one token per row per step. The step (model forward, sampling, EOS bookkeeping, output
   writes) reads and writes only persistent device buffers and never syncs with the host, so on CUDA
   it is captured once per *batch bucket* (1, 2, 4, ... up to ``max_batch_size``; a batch is padded up
   to its bucket with finished dummy rows) and replayed. With SDPA attention the key length is bucketed
   too (multiples of ``kv_block``), so a step reads the cache up to the longest row, not to ``max_length``.
3. Every ``check_every`` steps (only when an EOS is given) the host reads how many rows are still
   running: it stops when none is, and **compacts** the live rows into a smaller bucket when they fit.

Randomness: one ``torch.Generator`` per ``Generator`` on the model's device, registered with every
captured graph, reseeded from the caller's ``generator`` (or the global RNG) at the start of a call
and whenever the step's graph changes, so that a seeded call gives the same tokens whether or not the
graphs were already captured.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from fastppo._checks import check_bool, check_choice, check_number
from fastppo._direct_decode import DirectDecode
from fastppo._generation_checks import (
    FROM_MODEL,
    MAX_EOS,
    check_prompts,
    check_sampling,
    direct_decode_layers,
    eval_mode,
    inspect_model,
    special_tokens,
    unwrap_model,
)
from fastppo.attention import (
    ATTN_NAME,
    AttentionPlan,
    FlashDecode,
    KVCache,
    PackedPrefill,
    PaddedPrefill,
    SdpaDecode,
    attn_implementation,
    flash_attn_available,
    pack_padded,
)
from fastppo.sampling import sample_tokens


@dataclass
class GenerationOutput:
    """Result of :meth:`Generator.generate`.

    ``sequences`` int64 ``[B, P + N]``: the prompt exactly as given (left-padded), then the completion,
    ``pad_token_id`` after a row's EOS. ``N`` is the longest completion (``max_new_tokens`` when no
    row stopped early). ``completion_mask`` bool ``[B, N]``: real completion tokens, EOS included.
    ``logprobs`` float32 ``[B, N]``: ``log_softmax(logits / temperature)`` of each chosen token, before
    top-k/top-p filtering (0 where the mask is false). Timing: ``prefill_seconds``, ``decode_seconds``
    (graph captures excluded: they are ``capture_seconds``, paid once per bucket), ``tokens_per_second``.
    """

    sequences: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_length: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    num_tokens: int
    capture_seconds: float = 0.0

    @property
    def completions(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated (valid) tokens per second of prefill + decode."""
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Chunk:
    """What :meth:`Generator._generate_chunk` produced for its ``R`` rows: ``tokens`` int64, ``valid`` bool and
    ``logprobs`` float32, each ``[R, N]`` (``N``: the chunk's longest completion), and its timing."""

    tokens: torch.Tensor
    valid: torch.Tensor
    logprobs: torch.Tensor
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    capture_seconds: float


def _more_recompiles():
    """With ``compile=True`` every (bucket, key length, mode) is one more specialisation of the step;
    raise dynamo's per-function limit (8) for the warm-up that compiles it, instead of falling back to eager."""
    cfg = torch._dynamo.config
    names = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
    names = [n for n in names if hasattr(cfg, n)]
    return cfg.patch(**{n: max(getattr(cfg, n), 1024) for n in names})


def _autocast_state() -> tuple:
    """The caller's CUDA autocast (enabled, dtype); () without CUDA."""
    return (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) if torch.cuda.is_available() else ()


@contextlib.contextmanager
def _capture_safe():
    """What warm-up and capture of the decode step need, whatever the caller has switched on:

    * a caller's ``torch.autocast`` keeps the casts of the weights in a cache that is freed when its
      block exits; a graph would then read freed memory (and never see optimizer updates). Same
      autocast, but ``cache_enabled=False``: the casts are captured as kernels of the step.
    * ``torch.use_deterministic_algorithms(True)`` sends CUDA ``index_put_`` through a path that reads
      ``index.max()`` on the host, which is illegal while capturing. The step's indices are distinct
      (the scratch row aside), so the non-deterministic kernel computes the same thing.
    """
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    enabled, dtype = _autocast_state()
    torch.use_deterministic_algorithms(False)
    try:
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)


def _buckets(max_batch_size: int) -> list[int]:
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if (1 << i) < max_batch_size]
    return [*sizes, max_batch_size]


class Generator:
    """Rollout engine around a Hugging Face causal LM with full attention (tested: Llama, Qwen2, Mistral).
    A sliding window (Mistral, Qwen2's ``use_sliding_window``) is accepted when ``max_length <=
    sliding_window``: every query then sees all its keys, as with full attention.

    ``Generator(model, *, max_batch_size, max_length, cuda_graphs="auto", attention="auto",
    prefill="auto", check_every=16, kv_block=None, compile=False, direct_decode="auto")``

    * ``max_batch_size``: rows per decode batch (larger inputs are generated in chunks of this size);
      ``max_length``: prompt width + ``max_new_tokens`` limit. The KV cache
      (``layers * 2 * max_batch_size * max_length * kv_heads * head_dim`` elements) is allocated here,
      and it and the captured graphs are kept across calls.
    * ``cuda_graphs``: ``"auto"`` (on for CUDA models), ``True`` or ``False``.
    * ``attention``: decode attention, ``"flash"`` (``flash_attn_with_kvcache``, reads only the valid
      keys; needs flash-attn, CUDA, fp16/bf16) or ``"sdpa"``; ``"auto"`` picks flash when possible.
    * ``prefill``: ``"packed"`` (padding-free varlen; flash-attn on CUDA, a per-sequence SDPA loop
      otherwise) or ``"padded"`` (one masked SDPA); ``"auto"``: packed iff ``attention == "flash"``.
    * ``compile``: ``torch.compile`` the decode step (before capturing it on CUDA): fuses the model's
      elementwise ops (norms, rotary, activations), fewer kernels per step. Experimental: each
      (bucket, key length, mode) compiles once, at its first use.
    * ``direct_decode``: run the decode step's forward (and the padded prefill's) as :class:`DirectDecode`
      (the same operations, without the model's per-call overhead; under ``torch.inference_mode``).
      ``"auto"``: for a Llama, Qwen2 or Mistral model without adapters or hooks when the step runs eagerly
      (no CUDA graphs, no ``compile``, SDPA attention); ``True``: the same, an error where it cannot;
      ``False``: always the model's forward.

    A wrapped ``model`` is unwrapped: a model compiled by ``torch.compile`` (``OptimizedModule``), DDP,
    ``DataParallel`` or any wrapper holding it in ``.module``. The Generator runs the underlying eager
    module, with its own compilation (CUDA graphs, ``compile``); it shares the parameters, so updates made
    through the wrapper are seen.
    """

    def __init__(
        self,
        model,
        *,
        max_batch_size: int,
        max_length: int,
        cuda_graphs="auto",
        attention: str = "auto",
        prefill: str = "auto",
        check_every: int = 16,
        kv_block: int | None = None,
        compile: bool = False,
        direct_decode="auto",
    ):
        model = unwrap_model(model)
        max_batch_size = check_number("max_batch_size", max_batch_size, integer=True, ge=1)
        max_length = check_number("max_length", max_length, integer=True, ge=2)
        info = inspect_model(model, max_length)
        check_every = check_number("check_every", check_every, integer=True, ge=1)
        kv_block = check_number("kv_block", kv_block, integer=True, ge=1, allow_none=True)
        compile = check_bool("compile", compile)
        on_cuda = info.device.type == "cuda"
        cuda_graphs = check_choice("cuda_graphs", cuda_graphs, ("auto", True, False))
        cuda_graphs = on_cuda if cuda_graphs == "auto" else bool(cuda_graphs)
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device, the model is on {info.device}")
        flash_ok = on_cuda and flash_attn_available() and info.dtype in (torch.float16, torch.bfloat16)
        check_choice("attention", attention, ("auto", "flash", "sdpa"))
        if attention == "flash" and not flash_ok:
            raise ValueError("attention='flash' needs the flash-attn package, a CUDA model and fp16/bf16 weights")
        check_choice("prefill", prefill, ("auto", "packed", "padded"))
        direct_decode = check_choice("direct_decode", direct_decode, ("auto", True, False))
        self.model = model
        self.info = info
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.cuda_graphs = cuda_graphs
        self.attention = ("flash" if flash_ok else "sdpa") if attention == "auto" else attention
        self.prefill = ("packed" if self.attention == "flash" else "padded") if prefill == "auto" else prefill
        self.check_every = check_every
        # why 256: a step reads at most 255 dead cache slots per row, and a few key lengths -> few graphs
        self.kv_block = kv_block if kv_block is not None else (256 if on_cuda else 32)
        self.buckets = _buckets(max_batch_size)
        self.cache = KVCache.allocate(
            info.layers, max_batch_size, max_length, info.kv_heads, info.head_dim, info.dtype, info.device
        )
        self._allocate_state()
        self._rng = torch.Generator(device=info.device)
        self._graphs: dict = {}
        self._graph_params = None  # parameter addresses (and autocast state) the graphs were captured with
        self._pool = None
        self._capture_stream = None  # this generator's own: the process-wide default is bound to one device
        self._step_fn = self._step
        if compile:
            self._step_fn = torch.compile(self._step, dynamic=False)
        # the eager loop (no graphs, no compile) pays every op's dispatch: no autograd bookkeeping in it
        self._eager = not cuda_graphs and not compile
        self.direct_decode = False
        if direct_decode is not False:
            why = self._direct_unsupported()
            if why is not None and direct_decode is True:
                raise ValueError(f"direct_decode=True: {why}")
            self.direct_decode = why is None
        self._direct = None  # the DirectDecode of the generate call under way
        self._probe()

    # ---------------------------------------------------------------------------------------------
    # buffers
    # ---------------------------------------------------------------------------------------------
    def _allocate_state(self):
        r, n, dev = self.max_batch_size, self.max_length, self.info.device
        z = lambda *shape, dtype=torch.int64: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        self.tokens, self.seqlens, self.row_ids = z(r), z(r), z(r)
        self.finished = z(r, dtype=torch.bool)
        self.step_idx = z()
        # outputs are indexed by original row; row r (one past the last) is the scratch row of dummies
        self.out_tokens, self.out_valid = z(r + 1, n), z(r + 1, n, dtype=torch.bool)
        self.out_logprobs = z(r + 1, n, dtype=torch.float32)
        self.temperature, self.top_p = z(dtype=torch.float32), z(dtype=torch.float32)
        self.top_k, self.pad_id = z(), z()
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.int64, device=dev)
        self.arange = torch.arange(max(r, n), device=dev)  # row indices and cache slots, sliced per step

    def _state(self) -> dict:
        return {
            "tokens": self.tokens,
            "seqlens": self.seqlens,
            "row_ids": self.row_ids,
            "finished": self.finished,
            "step_idx": self.step_idx,
        }

    def _direct_unsupported(self) -> str | None:
        """Why the decode step cannot run as :class:`DirectDecode` (None: it can)."""
        if not self._eager or self.attention != "sdpa":
            return "it needs the eager decode loop (no CUDA graphs, no compile) with SDPA attention"
        if direct_decode_layers(self.model, self.max_length) is None:
            return (
                f"{type(self.model).__name__} is not a Llama, Qwen2 or Mistral causal LM with plain nn.Linear "
                "projections and no hooks"
            )
        return None

    def _forward(self, plan: AttentionPlan, **inputs) -> torch.Tensor:
        return self.model(**inputs, use_cache=False, fastppo_plan=plan).logits

    def _probe(self):
        """Run one token through the model: an unsupported model fails here with a clear message."""
        ids = torch.zeros(1, 1, dtype=torch.int64, device=self.info.device)
        zero = torch.zeros(1, dtype=torch.int64, device=self.info.device)
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.info.device)
        calls = []
        plan = PaddedPrefill(cache=self.cache, mask=mask, rows=zero, times=zero, slots=zero, on_call=calls.append)
        name = type(self.model).__name__
        try:
            with torch.no_grad(), attn_implementation(self.model), eval_mode(self.model):
                self._forward(plan, input_ids=ids, position_ids=zero[None], logits_to_keep=1)
        except (RuntimeError, TypeError) as e:
            if "fastppo_plan" in str(e):
                why = "its forward does not pass kwargs down to the attention function"
                raise ValueError(f"unsupported model {name}: {why}") from e
            raise
        if sorted(calls) != list(range(self.info.layers)):
            raise ValueError(
                f"unsupported model {name}: expected one {ATTN_NAME!r} attention call per layer "
                f"(0..{self.info.layers - 1}), got layers {sorted(calls)}"
            )

    # ---------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id=FROM_MODEL,
        pad_token_id=FROM_MODEL,
        generator: torch.Generator | None = None,
    ) -> GenerationOutput:
        """Complete left-padded prompts ``input_ids`` int ``[B, P]`` (``attention_mask`` ``[B, P]``, 0 = padding).

        ``do_sample=False``: greedy (argmax). Else sample from ``softmax(logits / temperature)``, after
        top-k (``0``: off) and top-p (``1.0``: off) filtering (these settings are this call's, not read from
        ``model.generation_config``).

        ``eos_token_id``: an int or a list of ints (at most 8), or ``None``: no stop token (always
        ``max_new_tokens``). ``pad_token_id`` fills a row after its EOS; ``None``: the first EOS id (0 without
        EOS). Omitted, either is ``model.generation_config``'s value, as in Hugging Face ``generate``: pass
        ``eos_token_id=None`` explicitly to run every row to ``max_new_tokens``.

        ``generator``: seeds the sampling (the same seed gives the same tokens on a given device); without it
        the global RNG (``torch.manual_seed``) does. It may live on any device, not only the model's: one draw
        from it seeds this Generator's own RNG. Batches larger than ``max_batch_size`` are generated in
        consecutive chunks.
        """
        ids, mask, lengths = check_prompts(input_ids, attention_mask, self.info.vocab, self.info.device)
        max_new_tokens = check_number("max_new_tokens", max_new_tokens, integer=True, ge=1)
        if ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = {ids.shape[1] + max_new_tokens} "
                f"exceeds max_length={self.max_length} of this Generator"
            )
        sampling = check_sampling(do_sample, temperature, top_k, top_p, generator)
        eos, pad_token_id = special_tokens(self.model, eos_token_id, pad_token_id, self.info.vocab)

        mode = sampling.mode
        seed = 0
        if sampling.do_sample:  # one draw from the caller's generator seeds the whole call
            gen_device = generator.device if generator is not None else "cpu"
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
        self.temperature.fill_(sampling.temperature)
        self.top_k.fill_(sampling.top_k)
        self.top_p.fill_(sampling.top_p)
        self.pad_id.fill_(pad_token_id)
        self.eos.fill_(-1)
        if eos:
            self.eos[: len(eos)] = torch.tensor(eos, dtype=torch.int64)

        if self.cuda_graphs:
            self._check_params()
        r = self.max_batch_size
        # hooks (or a sliding window) may have come since the Generator was made
        layers = direct_decode_layers(self.model, self.max_length) if self.direct_decode else None
        self._direct = DirectDecode(self.model, layers, self.max_length) if layers is not None else None
        try:
            parts = [
                self._generate_chunk(
                    ids[i : i + r], mask[i : i + r], lengths[i : i + r], max_new_tokens, mode, bool(eos), seed + i
                )
                for i in range(0, ids.shape[0], r)
            ]
        finally:
            self._direct = None  # its fused weights are copies: free them, and never reuse stale ones
        return self._merge(ids, parts, pad_token_id)

    def reset_graphs(self) -> None:
        """Drop the captured graphs (they are recaptured on use). Done automatically when a parameter
        tensor of the model was replaced; in-place weight updates (optimizer steps) need nothing."""
        self._graphs.clear()
        self._graph_params = None
        self._pool = None  # a fresh pool too: no graph holds the old one any more

    def _check_params(self):
        # a graph reads the parameters at the addresses seen at capture: in-place updates are fine,
        # re-assigned tensors (load_state_dict(assign=True), re-materialised shards) are not. Under a
        # caller's autocast the captured GEMMs read casts made inside the graph; a change of autocast
        # state changes what the step computes, so it also means recapturing.
        ptrs = [p.data_ptr() for p in self.model.parameters()] + [_autocast_state()]
        if ptrs != self._graph_params:
            self.reset_graphs()
            self._graph_params = ptrs

    # ---------------------------------------------------------------------------------------------
    # one chunk of at most max_batch_size rows
    # ---------------------------------------------------------------------------------------------
    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _kv_len(self, need: int) -> int:
        return min(self.max_length, -(-need // self.kv_block) * self.kv_block)

    def _sync(self):
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)

    def _generate_chunk(self, ids, mask, lengths, new_tokens, mode, has_eos, seed):
        rows = ids.shape[0]
        longest = int(lengths.max())
        self._rng.manual_seed(seed)
        grad_mode = torch.inference_mode() if self._eager else torch.no_grad()  # outputs are cloned outside it
        with grad_mode, attn_implementation(self.model), eval_mode(self.model):
            self._sync()
            t0 = time.perf_counter()
            logits = self._prefill(ids, mask, lengths)
            b = self._bucket(rows)
            self.out_tokens[:, :new_tokens] = self.pad_id
            self.out_valid[:, :new_tokens] = False
            self.out_logprobs[:, :new_tokens] = 0
            self.row_ids[:rows] = torch.arange(rows, device=ids.device)
            self.row_ids[rows:b] = self.max_batch_size
            self.finished[:b] = False
            self.seqlens[:rows] = lengths
            self.seqlens[rows:b] = 0
            self.tokens[rows:b] = self.pad_id
            self.step_idx.zero_()
            tok, lp = sample_tokens(
                logits, mode=mode, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, generator=self._rng
            )
            self._record(rows, tok, lp)
            self.finished[rows:b] = True
            self._sync()
            t1 = time.perf_counter()
            steps, key, capture = 0, None, 0.0
            for t in range(1, new_tokens):
                if has_eos and (t - 1) % self.check_every == 0:
                    b = self._check_and_compact(b, longest + t)
                    if b == 0:
                        break
                kv_len = self._kv_len(longest + t) if self.attention == "sdpa" else 0
                fresh = (b, kv_len, mode) != key
                if fresh:
                    key = (b, kv_len, mode)
                    if self.cuda_graphs and key not in self._graphs:
                        self._sync()  # capture synchronizes: queued replays must not count as capture time
                        tc = time.perf_counter()
                        self._capture(key)
                        capture += time.perf_counter() - tc
                    # reseed at each graph change: same tokens whether or not this graph was captured now
                    self._rng.manual_seed(seed + 7919 * t)
                if self.cuda_graphs:
                    self._graphs[key].replay()
                elif fresh and self._step_fn != self._step:  # compiled: a new specialisation may pass dynamo's 8
                    with _more_recompiles():
                        self._step_fn(*key)
                else:
                    self._step_fn(*key)
                steps += 1
            self._sync()
            t2 = time.perf_counter()
        n = new_tokens
        valid = self.out_valid[:rows, :n]
        if has_eos:
            n = int(valid.sum(-1).max())
        return _Chunk(
            tokens=self.out_tokens[:rows, :n].clone(),
            valid=self.out_valid[:rows, :n].clone(),
            logprobs=self.out_logprobs[:rows, :n].clone(),
            prefill_seconds=t1 - t0,
            decode_seconds=t2 - t1 - capture,
            decode_steps=steps,
            capture_seconds=capture,
        )

    def _merge(self, ids, parts: list[_Chunk], pad) -> GenerationOutput:
        n = max(p.tokens.shape[1] for p in parts)
        widen = lambda t, fill: torch.nn.functional.pad(t, (0, n - t.shape[1]), value=fill)  # noqa: E731
        tokens = torch.cat([widen(p.tokens, pad) for p in parts])
        valid = torch.cat([widen(p.valid, False) for p in parts])
        logprobs = torch.cat([widen(p.logprobs, 0.0) for p in parts])
        return GenerationOutput(
            sequences=torch.cat([ids, tokens], dim=1),
            completion_mask=valid,
            logprobs=logprobs,
            prompt_length=ids.shape[1],
            prefill_seconds=sum(p.prefill_seconds for p in parts),
            decode_seconds=sum(p.decode_seconds for p in parts),
            decode_steps=sum(p.decode_steps for p in parts),
            num_tokens=int(valid.sum()),
            capture_seconds=sum(p.capture_seconds for p in parts),
        )

    def _prefill(self, ids, mask, lengths) -> torch.Tensor:
        """Eager forward over the prompts: fills the cache rows ``0..B-1``, returns last-token logits ``[B, V]``."""
        _rows, width = ids.shape
        if self.prefill == "packed":
            packed = pack_padded(ids, mask)
            slots = packed.position_ids[0]
            plan = PackedPrefill(
                cache=self.cache,
                rows=packed.indices // width,
                slots=slots,
                cu_seqlens=packed.cu_seqlens,
                max_seqlen=packed.max_seqlen,
                flash=self.attention == "flash",
            )
            last = packed.cu_seqlens[1:].long() - 1
            logits = self._forward(
                plan, input_ids=packed.input_ids, position_ids=packed.position_ids, logits_to_keep=last
            )
            return logits[0].float()
        positions = mask.long().cumsum(-1) - 1
        b_idx, t_idx = mask.nonzero(as_tuple=True)
        causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
        # a padding query attends to itself only: no all-masked row (NaN) whose garbage could reach the cache
        attend = (causal[None] & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=ids.device)[None]
        plan = PaddedPrefill(
            cache=self.cache, mask=attend[:, None], rows=b_idx, times=t_idx, slots=positions[b_idx, t_idx]
        )
        if self._direct is not None:
            logits = self._direct.prefill(plan, ids, positions.clamp_min(0))
        else:
            logits = self._forward(plan, input_ids=ids, position_ids=positions.clamp_min(0), logits_to_keep=1)
        return logits[:, -1].float()

    # ---------------------------------------------------------------------------------------------
    # the decode step (captured) and its bookkeeping
    # ---------------------------------------------------------------------------------------------
    def _record(self, b, tok, lp):
        """Write this step's token/log-prob/validity for rows ``0..b-1`` at column ``step_idx``; no host sync."""
        fin = self.finished[:b]
        tok = torch.where(fin, self.pad_id, tok)  # where, not masked_fill: its tensor value may be read on the host
        lp = lp.masked_fill(fin, 0.0)
        where = (self.row_ids[:b], self.step_idx.expand(b))
        self.out_tokens.index_put_(where, tok)
        self.out_logprobs.index_put_(where, lp)
        self.out_valid.index_put_(where, ~fin)
        fin |= (tok[:, None] == self.eos).any(-1)
        self.tokens[:b] = tok
        self.step_idx += 1

    def _step(self, b: int, kv_len: int, mode: str):
        """Feed ``tokens[:b]`` at slots/positions ``seqlens[:b]``, sample the next tokens, record them."""
        seqlens = self.seqlens[:b]
        if self.attention == "flash":
            plan = FlashDecode(cache=self.cache, seqlens32=seqlens.to(torch.int32))
        else:
            valid = self.arange[:kv_len] <= seqlens[:, None]
            plan = SdpaDecode(cache=self.cache, seqlens=seqlens, mask=valid[:, None, None, :], rows=self.arange[:b])
        if self._direct is not None:
            logits = self._direct(plan, self.tokens[:b, None], seqlens[:, None])
        else:
            inputs = dict(input_ids=self.tokens[:b, None], position_ids=seqlens[:, None], logits_to_keep=1)
            logits = self._forward(plan, **inputs)
        tok, lp = sample_tokens(
            logits[:, -1],
            mode=mode,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            generator=self._graph_rng(mode),
        )
        self._record(b, tok, lp)
        seqlens += 1

    def _graph_rng(self, mode):
        # a non-default CUDA generator can only be used in a captured graph once registered with it
        # (torch >= 2.5); older torch falls back to the default generator (then not reproducible)
        if mode == "greedy":
            return None
        if self.cuda_graphs and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return None
        return self._rng

    def _check_and_compact(self, b: int, used_len: int) -> int:
        """Host check (one sync): returns the new bucket size, 0 when every row has finished."""
        live = (~self.finished[:b]).nonzero().flatten()
        n = live.numel()
        if n == 0:
            return 0
        nb = self._bucket(n)
        if nb == b:
            return b
        src = torch.cat([live, live[:1].expand(nb - n)])
        used_len = min(used_len, self.max_length)
        for cache in self.cache.keys + self.cache.values:
            cache[:nb, :used_len] = cache[src, :used_len]
        for t in (self.tokens, self.seqlens, self.row_ids):
            t[:nb] = t[src]
        self.row_ids[n:nb] = self.max_batch_size
        self.finished[:nb] = False
        self.finished[n:nb] = True
        return nb

    def _capture(self, key):
        """Warm up (lazy inits, compilation) on a side stream, undo its effects, then capture ``_step``."""
        saved = {k: v.clone() for k, v in self._state().items()}
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.info.device)
        stream = self._capture_stream
        stream.wait_stream(torch.cuda.current_stream(self.info.device))
        with _capture_safe(), torch.cuda.stream(stream), _more_recompiles():
            for _ in range(2):
                self._step_fn(*key)
                for k, v in saved.items():  # the warm-up wrote at the same slots the real step will overwrite
                    self._state()[k].copy_(v)
        torch.cuda.current_stream(self.info.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._graph_rng(key[2]) is not None:
            graph.register_generator_state(self._rng)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: CUDA calls of other threads (an NCCL watchdog, a data loader) don't break the capture
        with (
            _capture_safe(),
            torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"),
        ):
            self._step_fn(*key)
        self._graphs[key] = graph
