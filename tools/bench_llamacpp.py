"""Reference speed of llama.cpp (llama-cpp-python, CPU) on the default model (or `--model qwen15`), for `kvc-bench speed`.

The same Q4_1 GGUF file kvc loads (llama.cpp keeps its weights block-quantized; kvc dequantizes to
f32), the same token ids (the text tokenized with the reference SmolLM2 tokenizer, as
tools/bench_transformers.py does), the same lengths: prefill of N tokens, then greedy decode of D
tokens. Prints one JSON line per length, like `kvc-bench speed`.

    pip install llama-cpp-python   # builds llama.cpp from source (~10 min on 2 cores)
    python3 tools/bench_llamacpp.py --text assets/pride_and_prejudice_ch1-2.txt --tokens 1024,2048 --decode 32 --threads 2
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402


def main() -> None:
    ap = bench_common.parser(__doc__)
    ap.add_argument("--batch", type=int, default=512, help="llama.cpp prefill batch (n_batch)")
    args = ap.parse_args()
    path, ids, lens = bench_common.model_and_ids(args)
    llm = Llama(model_path=str(path), n_ctx=max(lens) + args.decode + 16, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=args.batch, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        # logits of the last evaluated token (llama-cpp-python 0.3.36 no longer copies them into
        # `scores` unless logits_all, which would compute logits for every prompt token)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    for n in lens:
        prompt = ids[:n]
        llm.reset()
        llm.eval(prompt[:16])  # warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t0
        nxt = last_argmax()
        t0 = time.perf_counter()
        for _ in range(args.decode - 1):
            llm.eval([nxt])
            nxt = last_argmax()
        decode = time.perf_counter() - t0
        print(json.dumps({"backend": "llama.cpp", "threads": args.threads, "prompt_tokens": n, "prefill_s": prefill,
                          "prefill_tok_s": n / prefill, "decode_tokens": args.decode,
                          "decode_tok_s": (args.decode - 1) / decode}), flush=True)


if __name__ == "__main__":
    main()
