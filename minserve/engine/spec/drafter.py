"""Rank 0's drafter models (speculative decoding), run by the ModelRunner right after a step's
verification, over that step's block tables; engine/spec/speculator.py picks the rows.

    DraftModelDrafter  "draft_model": a small model with the target's vocabulary
    HeadDrafter        "eagle3" (models/eagle3.py) and "mtp" (mtp.py): a head over the target's
                       hidden states of the step (3 layers' for EAGLE-3, the last for MTP)

Each is built by the one builder and has its own paged KV cache, as many blocks as the
target's: the same block ids, so the scheduler's tables serve both (with k lookahead slots past
a sampling row for the drafting steps). Drafts are greedy (argmax), so their distribution is
one-hot and verification is exact (rejection.py). Under tensor parallelism the drafter runs
whole (unsharded) on rank 0; the other ranks only verify."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from minserve.config import ConfigError, EngineConfig
from minserve.engine.runner import ModelInputs, ModelRunner, StepInputs, kv_block_bytes
from minserve.models import parallel


@dataclass
class DraftSource:
    """A drafter found at start-up, before anything is built."""
    method: str
    source: Any                     # builder.ModelSource: folder, config.json, registry row
    engine_config: EngineConfig     # the drafter's: its model, no LoRA, one rank
    target_folder: str              # (an EAGLE-3 head without embeddings copies the target's)


def find_draft(config: EngineConfig, target: Any, device: torch.device) -> DraftSource | None:
    """The drafter --speculative-config names, checked against the target (ConfigError naming
    the key and the fix); None for prompt lookup or no speculation."""
    spec = config.speculative_config
    if spec is None or spec.method == "ngram":
        return None
    own = dataclasses.replace(config, model=spec.model, revision=spec.revision,
                              quantization=spec.quantization, lora=None,
                              speculative_config=None, tensor_parallel_size=1, nnodes=1,
                              node_rank=0)
    if spec.method == "mtp":
        from minserve.engine.spec.mtp import mtp_source

        return DraftSource("mtp", mtp_source(target), dataclasses.replace(own, model=None),
                           target.folder)
    from minserve.engine.builder import find_model

    try:
        source = find_model(own, device, "draft" if spec.method == "eagle3" else "generate")
    except ConfigError as e:
        hint = ("an EAGLE-3 head was expected (a plain model drafts with \"method\": "
                "\"draft_model\")" if spec.method == "eagle3" else
                "a model with the target's vocabulary was expected (an EAGLE-3 head takes "
                "\"method\": \"eagle3\")")
        raise ConfigError(f"--speculative-config model {spec.model!r}: {e}; {hint}") from None
    tmc, dmc = target.model_config, source.model_config
    if dmc.vocab_size != tmc.vocab_size or not _same_vocabulary(source.folder, target.folder):
        raise ConfigError(f"--speculative-config model {spec.model!r}: its vocabulary "
                          f"({dmc.vocab_size} tokens) does not match the target's "
                          f"({tmc.vocab_size}); a draft must use the target's tokenizer")
    if spec.method == "eagle3":
        _check_eagle3(spec.model, target, dmc)
    return DraftSource(spec.method, source, own, target.folder)


def _same_vocabulary(a: str, b: str) -> bool:
    """Both folders' tokenizer.json map the same strings to the same ids (True when either has
    none: the config's vocab_size is all there is to compare)."""
    def vocab(folder: str) -> dict | None:
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
        ids = dict((tok.get("model") or {}).get("vocab") or {})
        ids.update({t["content"]: t["id"] for t in tok.get("added_tokens") or []})
        return ids
    va, vb = vocab(a), vocab(b)
    return va is None or vb is None or va == vb


def _check_eagle3(name: str, target: Any, head: Any) -> None:
    tmc = target.model_config
    if not target.arch.eagle3:
        raise ConfigError(f"--speculative-config: {target.arch.name} does not hand its hidden "
                          "states to an EAGLE-3 head; use \"ngram\" or a draft \"model\"")
    if head.target_hidden_size != tmc.hidden_size:
        raise ConfigError(f"--speculative-config model {name!r}: an EAGLE-3 head for hidden size "
                          f"{head.target_hidden_size}, the target's is {tmc.hidden_size}")
    layers = head.aux_hidden_state_layers or (2, tmc.num_hidden_layers // 2,
                                              tmc.num_hidden_layers - 3)
    if len(layers) != 3 or not all(0 <= i < tmc.num_hidden_layers for i in layers):
        raise ConfigError(f"--speculative-config model {name!r}: it reads layers {list(layers)} "
                          f"of a target with {tmc.num_hidden_layers}")


def build_drafter(draft: DraftSource, device: torch.device, target: torch.nn.Module
                  ) -> Drafter:
    """The drafter's weights, built whole; its KV cache comes with bind()."""
    from minserve.engine.builder import build_model

    with parallel.unsharded():
        built = build_model(draft.engine_config, draft.source, device)
    cls = DraftModelDrafter if draft.method == "draft_model" else HeadDrafter
    return cls(draft, built.model, built.dtype, device, target)


class Drafter:
    def __init__(self, draft: DraftSource, model: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device, target: torch.nn.Module) -> None:
        self.draft, self.model, self.dtype, self.device = draft, model, dtype, device
        self.mc = draft.source.model_config
        config = draft.engine_config
        fp8 = config.kv_cache_dtype in ("fp8", "fp8_e4m3")
        self.block_size = config.block_size
        self.bytes_per_block = kv_block_bytes(self.mc, config.block_size,
                                              self.mc.num_key_value_heads,
                                              torch.float8_e4m3fn if fp8 else dtype)
        self.runner: ModelRunner | None = None

    def bind(self, target_runner: ModelRunner) -> None:
        """Its own KV cache, as many blocks as the target's; the target's runner calls it."""
        with parallel.unsharded():
            self.runner = ModelRunner(self.model, self.mc, self.draft.engine_config, self.device,
                                      self.dtype, num_blocks=target_runner.num_blocks)
        target_runner.drafter = self

    def _capacity(self, table: list[int]) -> int:
        return len(table) * self.block_size

    def _decode(self, tokens: torch.Tensor, positions: list[int], tables: list[list[int]],
                state: Any) -> tuple[torch.Tensor, Any]:
        """One draft step: the rows' last drafts at `positions` -> the next ones."""
        raise NotImplementedError

    def _draft(self, first: tuple[torch.Tensor, Any], last_pos: list[int],
               tables: list[list[int]], num_drafts: list[int]) -> list[list[int]]:
        """Drafts of the rows whose first draft `first` holds ([P] tokens, and the state the
        next step reads), one token more per step for the rows that want more; one host sync."""
        tokens, state = first
        firsts, more, active = tokens, [], list(range(len(last_pos)))
        for j in range(1, max(num_drafts, default=0)):
            keep = [i for i, row in enumerate(active) if num_drafts[row] > j]
            if not keep:
                break
            if len(keep) < len(active):
                tokens, state = tokens[keep], self._select(state, keep)
                active = [active[i] for i in keep]
            tokens, state = self._decode(tokens, [last_pos[i] + j for i in active],
                                         [tables[i] for i in active], state)
            more.append((active, tokens))
        out = [[t] for t in firsts.tolist()]
        for rows, toks in more:
            for i, t in zip(rows, toks.tolist(), strict=True):
                out[i].append(t)
        return out

    @staticmethod
    def _select(state: Any, keep: list[int]) -> Any:
        return None if state is None else state[keep]

    def _decode_inputs(self, positions: list[int], tables: list[list[int]],
                       tokens: torch.Tensor) -> ModelInputs:
        """One token per row at `positions` (the tokens stay on the device)."""
        n = len(positions)
        inputs = self.runner.prepare_inputs(StepInputs([0] * n, [1] * n, positions, tables,
                                                       list(range(n)), None))
        inputs.input_ids = tokens
        return inputs


class DraftModelDrafter(Drafter):
    """A small causal LM: catches its cache up with each row's tokens (CatchUp), then drafts
    one token per forward."""

    def propose(self, step: StepInputs, inputs: ModelInputs, hidden: torch.Tensor,
                aux_hidden: torch.Tensor | None, emitted: list[list[int]]) -> list[list[int]]:
        d = step.draft
        drafts: list[list[int]] = [[] for _ in emitted]
        rows, tokens, counts, starts, tables, want = [], [], [], [], [], []
        for c in d.catch_ups:
            ids, start = c.token_ids, c.catchup_start
            sampled = c.whole and bool(emitted[c.row])
            if sampled:
                # accepted drafts are in the cache already (it ran them to draft); go on from
                # the first position it lacks: a rejected one's, or the accepted ones' end
                first = min(c.draft_end, start + len(ids) + len(emitted[c.row]) - 1)
                ids, start = (ids + emitted[c.row])[first - start:], first
            if not ids:
                continue
            table = step.block_tables[c.row]
            rows.append(c.row)
            tokens += ids
            counts.append(len(ids))
            starts.append(start)
            tables.append(table)
            last = start + len(ids) - 1
            want.append(min(d.num_drafts[c.row], self._capacity(table) - last) if sampled
                        else 0)
        if not rows:
            return drafts
        sample = [i for i, k in enumerate(want) if k > 0]
        first = self.runner.prepare_inputs(StepInputs(tokens, counts, starts, tables, sample,
                                                      None))
        h = self.runner.run_model(first)
        if not sample:
            return drafts
        toks = self.model.compute_logits(h[first.logits_indices]).argmax(dim=-1)
        for i, row_drafts in zip(sample, self._draft(
                (toks, None), [starts[i] + counts[i] - 1 for i in sample],
                [tables[i] for i in sample], [want[i] for i in sample]), strict=True):
            drafts[rows[i]] = row_drafts
        return drafts

    def _decode(self, tokens: torch.Tensor, positions: list[int], tables: list[list[int]],
                state: Any) -> tuple[torch.Tensor, Any]:
        inputs = self._decode_inputs(positions, tables, tokens)
        h = self.runner.run_model(inputs)
        return self.model.compute_logits(h).argmax(dim=-1), None


class HeadDrafter(Drafter):
    """A head over the target's hidden states (EAGLE-3; MTP heads alike). Its cache holds, at
    position p, what it computed from the target's state at p and the token at p + 1: each step
    it runs over the target's own positions (the kept ones), a token ahead, then drafts on its
    own states:

        target step:   t  d1 d2 d3        (d1, d2 accepted, b: the target's token after d2)
        head inputs:   d1 d2 b            with the target's states at t, d1, d2
        head drafts:   e1 from the last, then e2 from (e1, its own state), ..."""

    def __init__(self, draft: DraftSource, model: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device, target: torch.nn.Module) -> None:
        super().__init__(draft, model, dtype, device, target)
        self.target = target
        self.aux_layers = None
        if draft.method == "eagle3":
            n = target.config.num_hidden_layers
            self.aux_layers = self.mc.aux_hidden_state_layers or (2, n // 2, n - 3)
        self._load_tables(draft.source.folder, draft.engine_config.load_format == "dummy")

    def bind(self, target_runner: ModelRunner) -> None:
        super().bind(target_runner)
        if self.aux_layers is not None:
            self.target.set_aux_hidden_state_layers(self.aux_layers)

    def _load_tables(self, folder: str, dummy: bool) -> None:
        """d2t (draft id -> target id) from the checkpoint, and the target's embedding table when
        the head ships none (a whole copy when the target's is split across ranks)."""
        from minserve.models.loader import checkpoint_files, iter_weights

        names = set()
        wanted = {"d2t"} if not dummy else set()
        for name, tensor in (() if dummy else iter_weights(checkpoint_files(folder))):
            names.add(name.removeprefix("model."))
            if name.removeprefix("model.") in wanted:
                self.model.d2t = tensor.to(self.device, torch.long)
        if hasattr(self.model, "d2t") and "d2t" not in names:
            if self.mc.draft_vocab_size != self.mc.vocab_size and not dummy:
                raise ConfigError(f"{folder}: an EAGLE-3 head with a {self.mc.draft_vocab_size}-"
                                  "token vocabulary needs its d2t table")
            self.model.d2t = torch.zeros(self.mc.draft_vocab_size, dtype=torch.long,
                                         device=self.device)
        if not dummy and "embed_tokens.weight" not in names:
            self._share_embeddings()

    def _share_embeddings(self) -> None:
        table = self.target.model.embed_tokens
        if table.tp_size == 1:
            self.model.share_embeddings(self.target)
            return
        from minserve.models.loader import checkpoint_files, iter_weights

        for name, tensor in iter_weights(checkpoint_files(self.draft.target_folder)):
            if name.removeprefix("model.") == "embed_tokens.weight":
                self.model.embed_tokens.weight.data.copy_(tensor)
                return
        raise ConfigError("the EAGLE-3 head has no embed_tokens and the target's checkpoint "
                          "none to copy")

    def propose(self, step: StepInputs, inputs: ModelInputs, hidden: torch.Tensor,
                aux_hidden: torch.Tensor | None, emitted: list[list[int]]) -> list[list[int]]:
        d, nd = step.draft, step.num_draft_tokens
        tokens, index, counts, tables, want, last_pos = [], [], [], [], [], []
        start = 0
        for r, (n, ctx) in enumerate(zip(step.num_scheduled_tokens, step.num_computed_tokens,
                                         strict=True)):
            k = nd[r] if nd is not None else 0
            e = emitted[r]
            kept = n - k + len(e) - 1 if e else n
            row = step.token_ids[start:start + n]
            tokens += row[1:kept] + [e[-1] if e else d.next_token_ids[r]]
            index += range(start, start + kept)
            counts.append(kept)
            tables.append(step.block_tables[r])
            last_pos.append(ctx + kept - 1)
            want.append(min(d.num_drafts[r], self._capacity(step.block_tables[r])
                            - last_pos[-1]) if e else 0)
            start += n
        states = hidden if self.aux_layers is None else aux_hidden
        sample = [r for r, k in enumerate(want) if k > 0]
        first = self.runner.prepare_inputs(StepInputs(tokens, counts, step.num_computed_tokens,
                                                      tables, sample, None))
        h_in = self.model.combine_hidden_states(states[torch.tensor(index, device=self.device)])
        out, prenorm = self.model(first.input_ids, first.positions, first.attn, h_in)
        drafts: list[list[int]] = [[] for _ in emitted]
        if not sample:
            return drafts
        idx = first.logits_indices
        toks = self.model.draft_token_ids(out[idx])
        for r, row_drafts in zip(sample, self._draft(
                (toks, prenorm[idx]), [last_pos[r] for r in sample], [tables[r] for r in sample],
                [want[r] for r in sample]), strict=True):
            drafts[r] = row_drafts
        return drafts

    def _decode(self, tokens: torch.Tensor, positions: list[int], tables: list[list[int]],
                state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self._decode_inputs(positions, tables, tokens)
        out, prenorm = self.model(inputs.input_ids, inputs.positions, inputs.attn, state)
        return self.model.draft_token_ids(out), prenorm
