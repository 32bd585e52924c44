"""The KV cache the engine hands to the model, and through which a method decides what stays.

Per layer it holds keys and values ``[B, H_kv, S_l, D]`` and the absolute position of every entry:
``positions[l]`` is ``[B, S_l]`` when all KV heads keep the same entries, or ``[B, H_kv, S_l]`` once a
method keeps different entries per head. Position ``-1`` marks an entry that is not a real token
(left padding). Layers may hold different lengths; positions are absolute (tokens seen), never the
stored length, so a method can delete entries anywhere without disturbing RoPE.

Memory is really freed: :meth:`keep` replaces a layer's tensors by new, smaller ones and drops every
reference to the old ones.

Appending does not copy the layer every step (``torch.cat`` would, and at a few thousand entries that
copy costs as much as the attention itself): each layer's keys and values live in an allocation with
room for up to ``growth`` more entries, ``keys[l]`` / ``values[l]`` are views of its filled part, and a
step writes its entries in place. When the room runs out the layer moves to a new allocation with
``growth`` free slots. The prefill allocates exactly what it holds and every :meth:`keep` what it
keeps plus ``growth`` free slots (so the next step appends in place instead of copying the layer a
second time), so a layer never holds more than ``growth`` unused slots; :meth:`allocated_bytes`
counts them. Kept entries are copied by :func:`take_entries` (one ``index_select``), not ``torch.gather``.
"""

from __future__ import annotations

from collections import Counter

import torch

PAD_POSITION = -1
GROWTH = 32  # free slots a layer's allocation gets when appending runs out of room


def append_along(store: torch.Tensor, held: torch.Tensor, new: torch.Tensor, dim: int, growth: int = GROWTH):
    """``held`` (a leading view of ``store`` along ``dim``) followed by ``new``: (store, view).

    Written in place when ``store`` has room; otherwise a new store with ``growth`` free slots.
    """
    length, total = held.shape[dim], held.shape[dim] + new.shape[dim]
    if store.shape[dim] < total:
        shape = list(held.shape)
        shape[dim] = total + growth
        store = held.new_empty(shape)
        store.narrow(dim, 0, length).copy_(held)
    store.narrow(dim, length, new.shape[dim]).copy_(new)
    return store, store.narrow(dim, 0, total)


def _left_pad(x: torch.Tensor, width: int, fill) -> torch.Tensor:
    """``x`` with ``fill`` before its entries up to ``width`` entries: along the last dim of positions
    ``[B, (H,) S]``, along dim 2 of keys and values ``[B, H, S, D]``."""
    dim = 2 if x.dim() == 4 else -1
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_full(shape, fill), x], dim=dim)


def take_entries(x: torch.Tensor, index: torch.Tensor, room: int = 0) -> torch.Tensor:
    """Entries ``index`` (``[B, A]`` for every head, or ``[B, H, A]``) of ``x`` ``[B, H, S, D]``: what
    ``torch.gather`` along dim 2 gives, as one ``index_select`` over rows of ``D`` values (on CPU 2-13x
    faster than ``gather``, whose expanded index is read element by element). ``room``: the result has
    that many more entries (unset) after them, free slots for appending in place."""
    batch, heads, _, dim = x.shape
    index = index.to(x.device)  # a layer on another device than the engine's (model.device_map)
    if index.dim() == 2:
        index = index[:, None, :].expand(-1, heads, -1)
    if room:  # extra rows to select (any valid one); they become the free slots
        index = torch.cat([index, index.new_zeros(batch, heads, room)], dim=-1)
    strides = x.stride()
    if x.numel() == 0 or strides[3] != 1 or any(s % dim for s in strides[:3]):
        out = torch.gather(x, 2, index[..., None].expand(-1, -1, -1, dim))
    else:
        sb, sh, ss = (s // dim for s in strides[:3])
        rows = x.as_strided((1 + ((batch - 1) * sb + (heads - 1) * sh + (x.shape[2] - 1) * ss), dim), (dim, 1))
        batch_rows = torch.arange(batch, device=x.device)[:, None, None] * sb
        head_rows = torch.arange(heads, device=x.device)[None, :, None] * sh
        out = rows.index_select(0, (batch_rows + head_rows + index * ss).reshape(-1)).view(batch, heads, -1, dim)
    return out


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, growth: int = GROWTH):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.growth = growth
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # views of the filled part of ...
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._key_store: list[torch.Tensor | None] = [None] * num_layers  # ... these allocations
        self._value_store: list[torch.Tensor | None] = [None] * num_layers
        self._position_store: list[torch.Tensor | None] = [None] * num_layers  # of pruned layers' positions
        self.positions: list[torch.Tensor | None] = [None] * num_layers
        # Layers that were never pruned share one positions tensor (identity), so per-step work
        # (appending positions, masks, counting entries) is done once for all of them.
        self._shared_before: torch.Tensor | None = None
        self._shared_after: torch.Tensor | None = None
        self._shared_store: torch.Tensor | None = None
        self.step_positions: torch.Tensor | None = None  # [B, Q] positions of the tokens being fed
        self.phase = "prefill"  # of the step being fed: "prefill" | "decode"
        self.has_padding = False
        self.peak_entries: torch.Tensor | None = None  # [B] most entries each row has held (see observe)
        self.prunes = 0  # number of keep() calls so far: lets the engine skip re-measuring an unchanged cache
        self.method_state: dict = {}  # per-batch state a method keeps between steps
        self._memo: dict = {}  # per-step memo (masks), keyed by positions-tensor identity
        # what a method derives from the entries held (e.g. gathered anchors), kept across steps until
        # the entries move: cleared by every method of this class that rearranges them
        self.layout_memo: dict = {}

    # ------------------------------------------------------------------ feeding tokens
    def begin_step(self, positions: torch.Tensor, phase: str = "prefill") -> None:
        """Declare the absolute positions ``[B, Q]`` (``-1`` = padding) of the tokens fed next."""
        self.step_positions = positions
        self.phase = phase
        self.has_padding = self.has_padding or bool((positions < 0).any())
        self._shared_before = self._shared_after
        if self._shared_before is None:
            self._shared_store = self._shared_after = positions
        else:
            self._shared_store, self._shared_after = append_along(
                self._shared_store, self._shared_before, positions, -1, self.growth
            )
        self._memo.clear()

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by every attention layer: append this step's K/V, return what attention sees."""
        old_pos = self.positions[layer_idx]
        if self.keys[layer_idx] is None:
            self._set_layer(layer_idx, key, value)
        else:
            self._key_store[layer_idx], self.keys[layer_idx] = append_along(
                self._key_store[layer_idx], self.keys[layer_idx], key, -2, self.growth
            )
            self._value_store[layer_idx], self.values[layer_idx] = append_along(
                self._value_store[layer_idx], self.values[layer_idx], value, -2, self.growth
            )
        if old_pos is None or old_pos is self._shared_before:
            self.positions[layer_idx] = self._shared_after
        else:
            step = self.step_positions
            if old_pos.dim() == 3:
                step = step[:, None, :].expand(-1, old_pos.shape[1], -1)
            self._position_store[layer_idx], self.positions[layer_idx] = append_along(
                self._position_store[layer_idx], old_pos, step, -1, self.growth
            )
        return self.keys[layer_idx], self.values[layer_idx]

    def _set_layer(self, layer_idx: int, keys, values, key_store=None, value_store=None) -> None:
        """Hold ``keys`` / ``values`` (leading views of ``*_store`` when given) in the layer; the old
        allocation is dropped."""
        self.keys[layer_idx], self._key_store[layer_idx] = keys, keys if key_store is None else key_store
        self.values[layer_idx], self._value_store[layer_idx] = values, values if value_store is None else value_store

    def _take_layer(self, layer_idx: int, index: torch.Tensor) -> None:
        """Hold only entries ``index`` of the layer, in a new allocation with ``growth`` free slots."""
        length = index.shape[-1]
        stores = [take_entries(t, index, self.growth) for t in (self.keys[layer_idx], self.values[layer_idx])]
        self._set_layer(layer_idx, *(t.narrow(2, 0, length) for t in stores), *stores)

    def _reset_position_stores(self) -> None:
        """After positions were replaced: a layer with its own positions holds them exactly (no free
        slots); layers sharing the shared positions have no store of their own."""
        for layer in range(self.num_layers):
            own = self.positions[layer] is not self._shared_after
            self._position_store[layer] = self.positions[layer] if own else None

    # ------------------------------------------------------------------ pruning
    def keep(self, layer_idx: int, index: torch.Tensor) -> None:
        """Keep only the entries at ``index`` (``[B, S']`` for all heads, or ``[B, H_kv, S']``)."""
        pos = self.positions[layer_idx]
        index = index.to(pos.device)
        if index.dim() == 2:
            new_pos = (
                torch.gather(pos, -1, index)
                if pos.dim() == 2
                else torch.gather(pos, -1, index[:, None, :].expand(-1, pos.shape[1], -1))
            )
        else:
            if pos.dim() == 2:
                pos = pos[:, None, :].expand(-1, self.num_kv_heads, -1)
            new_pos = torch.gather(pos, -1, index)
        self._take_layer(layer_idx, index)
        self.positions[layer_idx] = self._position_store[layer_idx] = new_pos.contiguous()  # no longer shared
        self.prunes += 1
        self.layout_memo.clear()

    def keep_all(self, index: torch.Tensor) -> None:
        """Keep entries ``index`` ``[B, S']`` in every layer (all layers must hold the same entries).

        ``-1`` in ``index`` makes a padding entry (position ``-1``), so rows that keep different
        numbers of entries share one rectangle; put them first, as left padding. Unlike per-layer
        :meth:`keep`, the layers keep sharing one positions tensor, so per-step work stays once per step.
        """
        lengths = {self.layer_length(layer) for layer in range(self.num_layers)}
        if len(lengths) != 1 or self._shared_after is None or any(p is not self._shared_after for p in self.positions):
            raise ValueError("keep_all needs every layer to hold the same entries (shared positions)")
        filler = index < 0
        safe = index.clamp(min=0)
        for layer in range(self.num_layers):
            self._take_layer(layer, safe)
        positions = torch.gather(self._shared_after, -1, safe).masked_fill(filler, PAD_POSITION)
        self._shared_after = self._shared_store = positions
        self.positions = [positions] * self.num_layers
        self.has_padding = self.has_padding or bool(filler.any())
        self.prunes += 1
        self._memo.clear()
        self.layout_memo.clear()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (drop finished sequences, or repeat a prefilled prompt)."""
        remap: dict[int, torch.Tensor] = {}

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if id(t) not in remap:
                remap[id(t)] = t.index_select(0, rows.to(t.device))
            return remap[id(t)]

        self._shared_after = self._shared_store = pick(self._shared_after)
        for layer in range(self.num_layers):
            if self.keys[layer] is not None:
                self._set_layer(layer, pick(self.keys[layer]), pick(self.values[layer]))
            self.positions[layer] = pick(self.positions[layer])
        self._reset_position_stores()
        self._shared_before = pick(self._shared_before)
        self.step_positions = pick(self.step_positions)
        self.peak_entries = pick(self.peak_entries)
        for key, state in list(self.method_state.items()):
            if isinstance(state, torch.Tensor):
                self.method_state[key] = state.index_select(0, rows)
        self._memo.clear()
        self.layout_memo.clear()

    def append_rows(self, other: KVCache, entry_state: tuple[str, ...] = ()) -> None:
        """Add ``other``'s rows after this cache's (continuous batching: newly prefilled rows join the
        running ones). Per layer the shorter side is left-padded with padding entries (position -1),
        so every row keeps its entries in order; layers that share one positions tensor on both sides
        still share one. ``entry_state``: keys of ``method_state`` holding one value per cached entry
        (``[B, S]``, as the shared positions), padded alike (-1, or False); per-row tensors ``[B]`` are
        concatenated; other tensors are dropped (the method rebuilds them); the rest is kept as is."""
        joined: dict[tuple[int, int], torch.Tensor] = {}

        def join(a: torch.Tensor, b: torch.Tensor, fill) -> torch.Tensor:
            key = (id(a), id(b))
            if key not in joined:
                if a.dim() != b.dim():  # one side keeps per-head positions: give the other the same
                    a, b = (x[:, None, :].expand(-1, self.num_kv_heads, -1) if x.dim() == 2 else x for x in (a, b))
                dim = 2 if a.dim() == 4 else -1
                width = max(a.shape[dim], b.shape[dim])
                joined[key] = torch.cat([_left_pad(a, width, fill), _left_pad(b, width, fill)])
            return joined[key]

        for layer in range(self.num_layers):
            keys = join(self.keys[layer], other.keys[layer], 0)
            values = join(self.values[layer], other.values[layer], 0)
            self._set_layer(layer, keys, values)
            self.positions[layer] = join(self.positions[layer], other.positions[layer], PAD_POSITION)
        shared = self._shared_after is not None and other._shared_after is not None
        self._shared_after = self._shared_store = (
            join(self._shared_after, other._shared_after, PAD_POSITION) if shared else None
        )
        self._reset_position_stores()
        self._shared_before = self.step_positions = None
        self.peak_entries = torch.cat([self.peak_entries, other.peak_entries])
        for key in set(self.method_state) | set(other.method_state):
            mine, theirs = self.method_state.get(key), other.method_state.get(key)
            if key in entry_state:
                self.method_state[key] = join(mine, theirs, -1 if mine.dtype != torch.bool else False)
            elif isinstance(mine, torch.Tensor) and mine.dim() == 1:
                self.method_state[key] = torch.cat([mine, theirs])
            elif isinstance(mine, torch.Tensor):  # derived from the entries (e.g. an allocation): rebuilt
                del self.method_state[key]
        self.has_padding = any(bool((p < 0).any()) for p in {id(p): p for p in self.positions}.values())
        self.prunes += 1
        self._memo.clear()
        self.layout_memo.clear()

    def drop_leading_padding(self, entry_state: tuple[str, ...] = ()) -> None:
        """Free the leading entries that are padding in every row (left after the longest rows left);
        ``entry_state`` as in :meth:`append_rows`."""
        trimmed: dict[int, int] = {}
        for layer in range(self.num_layers):
            pos = self.positions[layer]
            if id(pos) not in trimmed:
                real = (pos >= 0).reshape(-1, pos.shape[-1]).any(0)
                trimmed[id(pos)] = int(real.int().argmax()) if bool(real.any()) else 0
        if not any(trimmed.values()):
            return
        shared = self._shared_after
        cut = {}
        for layer in range(self.num_layers):
            pos, start = self.positions[layer], trimmed[id(self.positions[layer])]
            if start:  # copied: the cache appends into leading views of its allocations only
                length = pos.shape[-1] - start
                self._set_layer(layer, *(t[:, :, start:].contiguous() for t in (self.keys[layer], self.values[layer])))
                if id(pos) not in cut:
                    cut[id(pos)] = pos.narrow(-1, start, length).contiguous()
                self.positions[layer] = cut[id(pos)]
        if shared is not None and id(shared) in cut:
            self._shared_after = self._shared_store = cut[id(shared)]
            for key in entry_state:
                self.method_state[key] = self.method_state[key][:, trimmed[id(shared)] :].contiguous()
        self._reset_position_stores()
        self.prunes += 1
        self._memo.clear()
        self.layout_memo.clear()

    # ------------------------------------------------------------------ measuring
    def entries_per_row(self) -> torch.Tensor:
        """Real K/V entries held per row: sum over layers and KV heads of non-padding positions."""
        if not self.has_padding:  # every entry is a real token: count by shape, no tensor work
            first = next(p for p in self.positions if p is not None)
            per_row = sum(
                p.shape[-1] * (p.shape[1] if p.dim() == 3 else self.num_kv_heads)
                for p in self.positions
                if p is not None
            )
            return torch.full((first.shape[0],), per_row, dtype=torch.long, device=first.device)
        uses = Counter(id(p) for p in self.positions if p is not None)
        by_id = {id(p): p for p in self.positions if p is not None}
        total = None
        for key, n_layers in uses.items():
            pos = by_id[key]
            valid = (pos >= 0).sum(dim=tuple(range(1, pos.dim())))
            if pos.dim() == 2:
                valid = valid * self.num_kv_heads
            total = valid * n_layers if total is None else total + valid * n_layers
        return total

    def observe(self) -> None:
        """Fold what is held now into ``peak_entries``: called after every forward, before and after
        pruning, and by a method that prunes inside the forward, before it prunes."""
        entries = self.entries_per_row()
        self.peak_entries = entries if self.peak_entries is None else torch.maximum(self.peak_entries, entries)

    def bytes_per_entry(self) -> int:
        """Bytes of one K/V entry pair (one token, one layer, one KV head)."""
        first = next(k for k in self.keys if k is not None)
        return 2 * self.head_dim * first.element_size()

    def tensor_bytes(self) -> int:
        """Bytes of the K/V tensors attention sees (padding included, free slots not)."""
        return sum(t.nbytes for t in self.keys + self.values if t is not None)

    def allocated_bytes(self) -> int:
        """Bytes of the K/V allocations: :meth:`tensor_bytes` plus at most ``growth`` free slots a layer."""
        return sum(t.nbytes for t in self._key_store + self._value_store if t is not None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen before the step being fed (transformers < 5.3 asks, to number the step)."""
        if self.step_positions is None:
            return 0
        return int(self.step_positions.max()) + 1 - self.step_positions.shape[-1]

    def layer_length(self, layer_idx: int) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[-2]

    # ------------------------------------------------------------------ visibility
    def step_memo(self, key: tuple, build):
        """``build()``, computed once per step for ``key``: a tuple of a name and the tensors it is
        derived from (compared by identity, so e.g. layers sharing one mask share the result)."""
        name, *sources = key
        found = self._memo.get(name)
        same = found is not None and len(found[0]) == len(sources)
        if not (same and all(a is b for a, b in zip(found[0], sources, strict=True))):
            found = self._memo[name] = (sources, build())
        return found[1]

    def base_mask(self, layer_idx: int, keys: slice | None = None) -> torch.Tensor:
        """Boolean ``[B, 1|H_kv, Q, S]`` mask: causal by absolute position, padding hidden; ``keys``:
        only those columns (not memoised).

        Padding queries see only padding keys, so no row is empty (an empty row gives NaN in SDPA).
        """
        kpos = self.positions[layer_idx]
        if keys is not None:
            return self._causal_mask(kpos[..., keys])
        memo_key = ("base", id(kpos))
        if memo_key not in self._memo:
            self._memo[memo_key] = self._causal_mask(kpos)
        return self._memo[memo_key]

    def _causal_mask(self, kpos: torch.Tensor) -> torch.Tensor:
        qpos = self.step_positions[:, None, :]
        if kpos.dim() == 2:
            kpos = kpos[:, None, :]
        q, k = qpos[..., :, None], kpos[..., None, :]
        allowed = (k <= q) & (k >= 0)
        if self.has_padding:
            allowed |= (q < 0) & (k < 0)
        return allowed
