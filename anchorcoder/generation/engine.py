"""Our own prefill + decode loop (not ``model.generate``), with the KV cache measured at every step.

Rows of a batch are (prompt, sample) pairs. Each distinct prompt is prefilled once (left-padded) and
its cache repeated for its samples; finished rows leave the batch at once, so their cache is freed.
With continuous batching (the default) a finished row's slot takes the next row at once: the newcomers
are prefilled on their own (in chunks if asked) and join the running rows' cache, left-padded;
otherwise a new batch starts only when the whole batch has finished. After every forward the method
prunes the cache, and the engine records, per row, the K/V entries and bytes held (after the forward,
before pruning, and after pruning) so that peaks are real.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

from anchorcoder.generation.attention import engine_attention
from anchorcoder.generation.cache import PAD_POSITION, KVCache
from anchorcoder.methods.base import KVMethod, StepInfo, stream_positions
from anchorcoder.registry import ConfigError

CONTEXT_TOKENS = 8  # tokens of preceding context used when decoding a continuation


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    n_samples: int = 1  # samples per prompt
    batch_size: int = 1  # rows (prompt x sample) decoded together
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    seed: int = 0
    prefill_chunk: int | None = None  # prompt tokens per prefill forward (the method prunes after each); None: all
    continuous_batching: bool = True  # a finished row's slot takes the next row at once (False: batch by batch)

    def __post_init__(self):
        self.stop = tuple(self.stop)
        checks = [
            (self.max_new_tokens >= 1, "generation.max_new_tokens must be >= 1"),
            (self.n_samples >= 1, "generation.n_samples must be >= 1"),
            (self.batch_size >= 1, "generation.batch_size must be >= 1"),
            (self.temperature >= 0, "generation.temperature must be >= 0"),
            (0 < self.top_p <= 1, "generation.top_p must be in (0, 1]"),
            (
                self.do_sample or self.n_samples == 1,
                "generation.n_samples > 1 needs generation.do_sample=true (greedy samples are identical)",
            ),
            (not self.do_sample or self.temperature > 0, "generation.do_sample=true needs temperature > 0"),
            (self.prefill_chunk is None or self.prefill_chunk >= 1, "generation.prefill_chunk must be >= 1 or null"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message} (got {self})")


@dataclass
class KVRecord:
    """K/V held by one sample; entries = (layer, KV head, token) triples, bytes = K and V together."""

    entries_final: int
    bytes_final: int
    entries_peak: int
    bytes_peak: int
    dense_entries_final: int
    dense_bytes_final: int
    dense_bytes_peak: int


@dataclass
class SampleResult:
    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"; "target" when teacher-forced
    kv: KVRecord
    prefill_s: float  # of the batch this sample was in
    batch_size: int
    nll: float | None = None  # teacher-forced: summed negative log-likelihood of token_ids (nats)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunStats:
    prefill_s: list[float] = field(default_factory=list)  # one per batch
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (the first token comes from prefill)
    generated_tokens: int = 0
    wall_s: float = 0.0
    kv_tensor_bytes_peak: int = 0  # largest K/V allocation of any batch, padding and free slots included
    cuda_prefill_max_allocated: int | None = None
    cuda_decode_max_allocated: int | None = None


def model_kv_shape(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a decoder-only transformers model."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


def check_batching(method: KVMethod, settings: GenerationSettings) -> None:
    if not method.handles_padding and settings.batch_size > 1:
        raise ConfigError(
            f"method={method.name} cannot handle left-padded batches: set generation.batch_size=1 "
            f"(got {settings.batch_size})"
        )
    if not method.chunked_prefill and settings.prefill_chunk is not None:
        raise ConfigError(
            f"method={method.name} compresses the whole prompt in one prefill forward: set "
            f"generation.prefill_chunk=null (got {settings.prefill_chunk})"
        )


def sample_generator(seed: int, prompt: int, sample: int, device) -> torch.Generator:
    """The random stream of one (prompt, sample): its draws do not depend on the batch it decodes in,
    the process it runs in (data-parallel eval) or the invocation (a resumed run)."""
    key = hashlib.blake2b(f"{seed}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key, "little") >> 1)


def sample_next(logits: torch.Tensor, settings: GenerationSettings, generators: list[torch.Generator] | None):
    """Greedy argmax, or temperature + top-p sampling with each row's own generator; ``logits`` is
    ``[B, V]`` float32."""
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > settings.top_p  # keeps at least the top token
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators, strict=True)])


@functools.cache
def _cache_argument(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(model) -> str:
    """The name under which the model's forward takes a cache (``past_key_values`` before transformers 5.24)."""
    return _cache_argument(type(model))


def forward_with_cache(
    model, cache: KVCache, method: KVMethod, input_ids, positions, logits_to_keep: int = 0, phase: str = "prefill",
    prompt_done: bool = True,
):  # fmt: skip
    """One forward of ``input_ids`` at absolute ``positions`` (``-1`` = padding) through ``cache``;
    ``prompt_done=False`` for a prompt chunk that more prompt follows.

    The model's attention must be routed through :func:`engine_attention`.
    """
    cache.begin_step(positions, phase)
    method.before_step(cache, StepInfo(input_ids=input_ids, positions=positions, phase=phase, prompt_done=prompt_done))
    return model(
        input_ids=input_ids,
        position_ids=positions.clamp(min=0),
        **{cache_argument(model): cache},
        use_cache=True,
        logits_to_keep=logits_to_keep,
        kv_cache=cache,
        kv_method=method,
    )


def incremental_logits(
    model, method: KVMethod, input_ids: torch.Tensor, chunks: list[int], observe=None, prompt: int | None = None
):
    """Logits ``[B, T, V]`` of feeding ``input_ids`` ``[B, T]`` in chunks (e.g. ``[prompt, 1, 1, ...]``)
    through a :class:`KVCache`, the method pruning after every chunk: what a trained method's masked
    forward must reproduce. The first ``prompt`` tokens (default: the first chunk) are the prompt, fed
    as prefill chunks (e.g. ``[7, 7, 7, 3, 1, 1, ...]`` with ``prompt=24``). ``observe(cache, end)`` is
    called after each chunk's pruning."""
    prompt = chunks[0] if prompt is None else prompt
    ends = [sum(chunks[: i + 1]) for i in range(len(chunks))]
    if sum(chunks) != input_ids.shape[1] or min(chunks) < 1 or prompt not in ends:
        raise ValueError(
            f"chunks {chunks} must be positive, sum to the sequence length {input_ids.shape[1]} and end one at "
            f"the prompt's end ({prompt})"
        )
    cache = KVCache(*model_kv_shape(model))
    logits, start = [], 0
    every_position = stream_positions(input_ids, method.skip_position_ids)
    with engine_attention(model), torch.inference_mode():
        for size in chunks:
            ids = input_ids[:, start : start + size]
            positions = every_position[:, start : start + size]
            phase, done = ("prefill", start + size == prompt) if start < prompt else ("decode", True)
            out = forward_with_cache(model, cache, method, ids, positions, phase=phase, prompt_done=done).logits
            logits.append(out.to(torch.promote_types(out.dtype, torch.float32)))
            method.after_step(cache, StepInfo(ids, positions, phase, done))
            start += size
            if observe is not None:
                observe(cache, start)
    return torch.cat(logits, dim=1)


class GenerationEngine:
    def __init__(self, model, tokenizer, method: KVMethod, settings: GenerationSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.settings = settings
        self.device = next(model.parameters()).device  # the embeddings'; with device_map, layers may sit elsewhere
        spread = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
        if len(spread) > 1 and method.reads_other_layers:
            raise ConfigError(
                f"method={method.name} as configured attends to another layer's cache, and model.device_map "
                f"spread the layers over {', '.join(sorted(spread))}: load the model on one device "
                f"(model.device_map=null), or turn that option off (configs/method/{method.name}.yaml)"
            )
        check_batching(method, settings)
        self.num_layers, self.num_kv_heads, self.head_dim = model_kv_shape(model)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos) if settings.stop_at_eos else set()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        self.stats = RunStats()
        self._stop_window = max((len(s) for s in settings.stop), default=0) + 8  # tokens

    # ------------------------------------------------------------------ public
    def generate(
        self,
        prompts: list[list[int]],
        on_result: Callable[[SampleResult], None] | None = None,
        rows: Iterable[tuple[int, int]] | None = None,
        targets: list[list[int]] | None = None,
    ) -> list[SampleResult]:
        """Generate ``n_samples`` continuations of every prompt (token ids, no padding).

        ``rows`` restricts the work to given (prompt index, sample index) pairs (resuming a run).
        ``on_result`` is called as soon as each sample finishes.
        ``targets`` teacher-forces one continuation per prompt instead of sampling: every target
        token is fed through the same cache and method as in generation, and its log-likelihood
        under the logits before it is summed into ``SampleResult.nll``.
        """
        if targets is not None:
            if len(targets) != len(prompts) or not all(targets):
                raise ConfigError("teacher forcing needs one non-empty target per prompt")
            if self.settings.n_samples != 1:
                raise ConfigError("teacher forcing scores one continuation per prompt: set generation.n_samples=1")
        if rows is None:
            rows = [(p, s) for p in range(len(prompts)) for s in range(self.settings.n_samples)]
        rows = list(rows)
        results: list[SampleResult] = []

        def finished(result: SampleResult) -> None:
            results.append(result)
            if on_result is not None:
                on_result(result)

        with engine_attention(self.model), torch.inference_mode():
            self._decode_rows(rows, prompts, targets, finished)
        order = {row: i for i, row in enumerate(rows)}
        return sorted(results, key=lambda r: order[(r.prompt_index, r.sample_index)])

    # ------------------------------------------------------------------ internals
    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _cuda_peak_start(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _cuda_peak(self, attr: str):
        if self.device.type == "cuda":
            value = torch.cuda.max_memory_allocated(self.device)
            setattr(self.stats, attr, max(getattr(self.stats, attr) or 0, value))

    def _prefill(self, cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor):
        """Feed the prompts in chunks of ``prefill_chunk`` tokens (all at once by default), the method
        pruning after each, so the cache never holds more than what the method keeps plus one chunk."""
        width = input_ids.shape[1]
        chunk = self.settings.prefill_chunk or width
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            logits = self._forward(cache, input_ids[:, start:end], positions[:, start:end], "prefill", end == width)
        return logits

    def _forward(self, cache: KVCache, input_ids, positions, phase: str, prompt_done: bool = True):
        out = forward_with_cache(
            self.model, cache, self.method, input_ids, positions, logits_to_keep=1, phase=phase, prompt_done=prompt_done
        )
        self._observe(cache)  # before pruning: the full step existed in memory
        prunes = cache.prunes
        self.method.after_step(cache, StepInfo(input_ids, positions, phase, prompt_done))
        if cache.prunes != prunes:
            self._observe(cache)
        return out.logits[:, -1, :].float().to(self.device)  # the head may sit on another device (device_map)

    def _observe(self, cache: KVCache):
        cache.observe()
        self.stats.kv_tensor_bytes_peak = max(self.stats.kv_tensor_bytes_peak, cache.allocated_bytes())

    def _left_pad(self, seqs: list[list[int]]):
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        pos = torch.full((len(seqs), width), PAD_POSITION, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            pos[r, width - len(s) :] = stream_positions(ids[r, width - len(s) :], self.method.skip_position_ids)
        return ids.to(self.device), pos.to(self.device)

    def _decode_continuation(self, context: list[int], tokens: list[int]) -> str:
        """Text of ``tokens`` as it reads after ``context``, special tokens kept.

        Decoding the new tokens alone loses a leading space with SentencePiece-style decoders
        (Llama / CodeLlama strip one at the start of a string); a few tokens of context avoid that.
        Special tokens are kept so stop strings such as ``<|`` see them.
        """
        hidden = self.method.hidden_token_ids  # tokens a method inserts (e.g. AnLLM's <AC>) never reach text
        if hidden:  # the context's tail only: this runs every step for the stop check
            context = [t for t in context[-4 * CONTEXT_TOKENS :] if t not in hidden]
            tokens = [t for t in tokens if t not in hidden]
        context = context[-CONTEXT_TOKENS:]
        head = self.tokenizer.decode(context, skip_special_tokens=False)
        full = self.tokenizer.decode(context + tokens, skip_special_tokens=False)
        if full.startswith(head):
            return full[len(head) :]
        return self.tokenizer.decode(tokens, skip_special_tokens=False)  # context merged across the seam

    def _hit_stop(self, prompt: list[int], tokens: list[int]) -> bool:
        if not self.settings.stop:
            return False
        window = tokens[-self._stop_window :]
        context = prompt if len(window) == len(tokens) else tokens[: -self._stop_window]
        tail = self._decode_continuation(context, window)
        return any(s in tail for s in self.settings.stop)

    def _finish_text(self, prompt: list[int], tokens: list[int]) -> str:
        text = self._decode_continuation(prompt, tokens)
        cut = min((i for i in (text.find(s) for s in self.settings.stop) if i >= 0), default=len(text))
        return text[:cut]

    def _admit(self, admitted: list[tuple[int, int]], prompts: list[list[int]], running: int):
        """Prefill the rows ``admitted`` (prompt, sample) together: a new cache, the logits of their
        first token and their :class:`_Row` records."""
        unique = list(dict.fromkeys(p for p, _ in admitted))
        for p in unique:
            if not prompts[p]:
                raise ConfigError(f"prompt {p} is empty after tokenisation")
        cache = KVCache(self.num_layers, self.num_kv_heads, self.head_dim)
        input_ids, positions = self._left_pad([prompts[p] for p in unique])
        self._cuda_peak("cuda_decode_max_allocated")
        self._cuda_peak_start()
        self._sync()
        t0 = time.perf_counter()
        logits = self._prefill(cache, input_ids, positions)
        if len(unique) != len(admitted):  # one prefill per prompt, repeated for its samples
            expand = torch.tensor([unique.index(p) for p, _ in admitted], device=self.device)
            cache.select_rows(expand)
            self.stats.kv_tensor_bytes_peak = max(self.stats.kv_tensor_bytes_peak, cache.allocated_bytes())
            logits = logits[expand]
        self._sync()
        prefill_s = time.perf_counter() - t0
        self._cuda_peak("cuda_prefill_max_allocated")
        self._cuda_peak_start()
        self.stats.prefill_s.append(prefill_s)
        self.stats.prefill_tokens += sum(len(prompts[p]) for p in unique)
        batch = running + len(admitted)
        skips = self.method.skip_position_ids
        rows = [_Row(p, s, sum(t not in skips for t in prompts[p]), prefill_s, batch) for p, s in admitted]
        if self.settings.do_sample:
            for row in rows:
                row.generator = sample_generator(self.settings.seed, row.prompt, row.sample, self.device)
        return cache, logits, rows

    def _decode_rows(self, rows: list[tuple[int, int]], prompts, targets, finished: Callable[[SampleResult], None]):
        settings = self.settings
        pending = deque(rows)
        active: list[_Row] = []  # batch slot -> row
        cache, logits = None, None
        while pending or active:
            start = time.perf_counter()
            room = settings.batch_size - len(active)
            if pending and room and (settings.continuous_batching or not active):
                admitted = [pending.popleft() for _ in range(min(room, len(pending)))]
                new_cache, new_logits, new_rows = self._admit(admitted, prompts, len(active))
                if cache is None:
                    cache, logits = new_cache, new_logits
                else:  # newcomers join the running rows
                    cache.append_rows(new_cache, self.method.entry_state)
                    logits = torch.cat([logits, new_logits])
                    self.stats.kv_tensor_bytes_peak = max(self.stats.kv_tensor_bytes_peak, cache.allocated_bytes())
                active += new_rows
            t_decode = time.perf_counter()
            keep = self._step(cache, logits, active, prompts, targets, finished)
            if len(keep) != len(active):  # finished rows leave the batch; their cache is freed
                active = [active[slot] for slot in keep]
                if active:
                    cache.select_rows(torch.tensor(keep, device=self.device))
                    cache.drop_leading_padding(self.method.entry_state)
                else:
                    cache = None
            if active:
                skips = self.method.skip_position_ids
                fed = [row.feed.pop(0) for row in active]  # each row's next token, inserted ones first
                feed = torch.tensor([[token] for token in fed], device=self.device)
                positions = [[max(row.seen - (token in skips), 0)] for row, token in zip(active, fed, strict=True)]
                logits = self._forward(cache, feed, torch.tensor(positions, device=self.device), "decode")
                for row, token in zip(active, fed, strict=True):
                    row.seen += token not in skips
                self.stats.decode_tokens += sum(token not in skips for token in fed)
            self._sync()
            self.stats.decode_s += time.perf_counter() - t_decode
            self.stats.wall_s += time.perf_counter() - start  # per step, so stats stay whole if stopped
        self._cuda_peak("cuda_decode_max_allocated")

    def _step(self, cache: KVCache, logits, active: list[_Row], prompts, targets, finished) -> list[int]:
        """Choose every active row's next token; report the rows that finished; the slots that go on."""
        # rows still feeding tokens the method inserted choose nothing: their logits are the inserted token's
        if targets is None:
            generators = [row.generator for row in active] if self.settings.do_sample else None
            next_tokens = sample_next(logits, self.settings, generators).tolist()
        else:
            next_tokens = [targets[row.prompt][row.steps] for row in active]
            chosen = torch.tensor(next_tokens, device=self.device)[:, None]
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, chosen)[:, 0].tolist()
            for slot, row in enumerate(active):  # tokens the method inserts are fed, not scored
                if not row.feed and next_tokens[slot] not in self.method.hidden_token_ids:
                    row.nll -= logprobs[slot]
        keep, entries = [], None
        for slot, row in enumerate(active):
            if row.feed:
                keep.append(slot)
                continue
            token = next_tokens[slot]
            row.steps += 1
            reason = None
            if targets is not None:
                row.tokens.append(token)
                if row.steps == len(targets[row.prompt]):
                    reason = "target"
            elif token in self.eos_ids:
                reason = "eos"
            else:
                row.tokens.append(token)
                if self._hit_stop(prompts[row.prompt], row.tokens):
                    reason = "stop"
                elif row.steps == self.settings.max_new_tokens:
                    reason = "length"
            if targets is not None or reason != "eos":
                self.stats.generated_tokens += 1
            if reason is None:
                inserted = self.method.tokens_before(prompts[row.prompt], row.tokens[:-1], token)
                if inserted:
                    row.tokens[-1:] = [*inserted, token]
                row.feed = [*inserted, token]
                keep.append(slot)
                continue
            if entries is None:
                entries = cache.entries_per_row().tolist()
            finished(self._result(row, reason, entries[slot], int(cache.peak_entries[slot]), cache, prompts, targets))
        return keep

    def _result(self, row: _Row, reason: str, entries: int, peak: int, cache: KVCache, prompts, targets):
        per_entry = cache.bytes_per_entry()
        dense = self.num_layers * self.num_kv_heads * row.seen
        prompt = prompts[row.prompt]
        return SampleResult(
            prompt_index=row.prompt,
            sample_index=row.sample,
            prompt_token_ids=list(prompt),
            token_ids=row.tokens,
            text=self._finish_text(prompt, row.tokens),
            finish_reason=reason,
            kv=KVRecord(
                entries_final=entries,
                bytes_final=entries * per_entry,
                entries_peak=peak,
                bytes_peak=peak * per_entry,
                dense_entries_final=dense,
                dense_bytes_final=dense * per_entry,
                dense_bytes_peak=dense * per_entry,
            ),
            prefill_s=row.prefill_s,
            batch_size=row.batch_size,
            nll=None if targets is None else row.nll,
        )


@dataclass
class _Row:
    """One (prompt, sample) being decoded."""

    prompt: int
    sample: int
    seen: int  # tokens fed so far (the prompt, then the generated ones), skip_position_ids not counted
    prefill_s: float  # of the prefill it joined with
    batch_size: int  # rows decoding when it joined
    tokens: list[int] = field(default_factory=list)  # generated, with the tokens the method inserted
    feed: list[int] = field(default_factory=list)  # to feed, one per step: inserted tokens, then the chosen one
    steps: int = 0  # tokens chosen
    nll: float = 0.0  # teacher-forced
    generator: torch.Generator | None = None  # its own random stream when sampling
