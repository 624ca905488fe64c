"""Reference speed of transformers (torch, CPU) on the default model, for `kvc-bench speed`.

Same weights (the SmolLM2 Q4_1 GGUF -- or with `--model qwen15` the Qwen2.5-Coder-1.5B Q4_K_M GGUF --
dequantized to float32 by transformers), same token ids (the text is tokenized with the model's
reference tokenizer, identical to kvc's), same lengths:
prefill of N tokens (one forward pass), then greedy decode of D tokens. Prints one JSON line per
length, like `kvc-bench speed`.

    python3 tools/bench_transformers.py --text assets/pride_and_prejudice_ch1-2.txt --tokens 1024,2048 --decode 32 --threads 2 [--dtype bf16]
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402
import make_model_fixtures as mmf  # noqa: E402


def main() -> None:
    ap = bench_common.parser(__doc__)
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"],
                    help="weights, activations and KV cache (kvc's --dtype)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path, ids, lens = bench_common.model_and_ids(args)
    model = mmf.load_gguf_model(path)
    model = model.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype])
    model.config._attn_implementation = args.attn
    with torch.no_grad():
        for n in lens:
            prompt = torch.tensor([ids[:n]])
            model(prompt[:, :16])  # warm-up
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t0
            cache = out.past_key_values
            nxt = out.logits[0, -1].argmax()
            t0 = time.perf_counter()
            for _ in range(args.decode - 1):
                out = model(nxt.view(1, 1), past_key_values=cache, use_cache=True)
                nxt = out.logits[0, -1].argmax()
            decode = time.perf_counter() - t0
            print(json.dumps({"backend": f"transformers-{args.attn}", "threads": args.threads, "dtype": args.dtype, "prompt_tokens": n,
                              "prefill_s": prefill, "prefill_tok_s": n / prefill,
                              "decode_tokens": args.decode, "decode_tok_s": (args.decode - 1) / decode}), flush=True)


if __name__ == "__main__":
    main()
