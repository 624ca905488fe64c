"""Writes crates/kvc-models/tests/fixtures/tiny_tokenizer/: a small byte-level BPE tokenizer.json
(400 tokens, trained by the `tokenizers` library on the first chapters of Pride and Prejudice in
assets/) and a tokenizer_config.json with BOS/EOS and a ChatML template. It seeds the fuzzing of
HF tokenizer folders (tests/fuzz_parsers.rs): small enough that thousands of mutated copies parse
per minute. Run: python3 tools/make_tokenizer_fixture.py (tokenizers 0.22)."""
import json
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

root = pathlib.Path(__file__).resolve().parent.parent
out = root / "crates/kvc-models/tests/fixtures/tiny_tokenizer"
out.mkdir(parents=True, exist_ok=True)
text = (root / "assets/pride_and_prejudice_ch1-2.txt").read_text()

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.post_processor = processors.ByteLevel(trim_offsets=False)
special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
tok.save(str(out / "tokenizer.json"))

template = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}
(out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
print("wrote", out, (out / "tokenizer.json").stat().st_size, "bytes")
