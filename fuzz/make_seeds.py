#!/usr/bin/env python3
"""Write seed inputs for the `untrusted_files` and `model_files` fuzz targets into
fuzz/corpus/<target>/ (ignored by git): small but valid files of every kind those targets
parse, so the fuzzer starts from inputs that reach deep into each parser. Standard
library only; run from anywhere: python3 fuzz/make_seeds.py
"""

import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_fasttext(quantized):
    """A fastText supervised model (file version 12): 3 words, 3 labels, dimension 4,
    character n-grams 2-3 and word bigrams in 8 buckets, hierarchical softmax; the input
    matrix dense or product-quantised (2 sub-quantisers of 2, with norms)."""
    dim, bucket = 4, 8
    words, labels = ["</s>", "hello", "world"], ["__label__a", "__label__b", "__label__c"]
    b = struct.pack("<2i", 793712314, 12)
    # dim ws epoch minCount neg wordNgrams loss(hs) model(sup) bucket minn maxn lrUpdateRate t
    b += struct.pack("<12id", dim, 5, 5, 1, 5, 2, 1, 3, bucket, 2, 3, 100, 1e-4)
    b += struct.pack("<3iqq", 6, 3, 3, 100, -1)
    for i, w in enumerate(words + labels):
        b += w.encode() + b"\0" + struct.pack("<qb", 10 - i, 0 if i < 3 else 1)
    rows = len(words) + bucket

    def dense(m):
        return struct.pack("<qq", m, dim) + f32s(m * dim)

    def pq(d, nsubq, dsub, last):
        return struct.pack("<4i", d, nsubq, dsub, last) + f32s(d * 256)

    if quantized:
        b += b"\x01" + b"\x01" + struct.pack("<qqi", rows, dim, rows * 2)
        b += bytes(i * 37 % 256 for i in range(rows * 2)) + pq(dim, 2, 2, 2)
        b += bytes(i * 11 % 256 for i in range(rows)) + pq(1, 1, 1, 1)
    else:
        b += b"\x00" + dense(rows)
    b += b"\x00" + dense(len(labels))
    return b


def put(target, name, selector, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes([selector]) + data)


def f32s(n, scale=0.01):
    return struct.pack(f"<{n}f", *[((i * 37) % 17 - 8) * scale for i in range(n)])


# --- a tiny BERT: config.json, NUL, model.safetensors ---------------------------------
def tiny_bert():
    h, ffn, vocab, pos, layers = 8, 16, 12, 16, 1
    config = {
        "model_type": "bert", "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": 2, "intermediate_size": ffn,
        "max_position_embeddings": pos, "type_vocab_size": 2,
    }
    shapes = {
        "embeddings.word_embeddings.weight": [vocab, h],
        "embeddings.position_embeddings.weight": [pos, h],
        "embeddings.token_type_embeddings.weight": [2, h],
        "embeddings.LayerNorm.weight": [h], "embeddings.LayerNorm.bias": [h],
    }
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            shapes[f"{p}.attention.self.{n}.weight"] = [h, h]
            shapes[f"{p}.attention.self.{n}.bias"] = [h]
        shapes[f"{p}.attention.output.dense.weight"] = [h, h]
        shapes[f"{p}.attention.output.dense.bias"] = [h]
        shapes[f"{p}.attention.output.LayerNorm.weight"] = [h]
        shapes[f"{p}.attention.output.LayerNorm.bias"] = [h]
        shapes[f"{p}.intermediate.dense.weight"] = [ffn, h]
        shapes[f"{p}.intermediate.dense.bias"] = [ffn]
        shapes[f"{p}.output.dense.weight"] = [h, ffn]
        shapes[f"{p}.output.dense.bias"] = [h]
        shapes[f"{p}.output.LayerNorm.weight"] = [h]
        shapes[f"{p}.output.LayerNorm.bias"] = [h]
    header, data, off = {}, b"", 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + 4 * n]}
        data += f32s(n)
        off += 4 * n
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    st = struct.pack("<Q", len(hj)) + hj + data
    return json.dumps(config).encode() + b"\0" + st


# --- a tiny llama GGUF with a byte-level BPE vocabulary --------------------------------
def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, kind, value):
    out = gguf_str(key) + struct.pack("<I", kind)
    if kind == 4:
        out += struct.pack("<I", value)
    elif kind == 6:
        out += struct.pack("<f", value)
    elif kind == 8:
        out += gguf_str(value)
    elif kind == 9:
        elem, items = value
        out += struct.pack("<IQ", elem, len(items))
        for it in items:
            out += gguf_str(it) if elem == 8 else struct.pack("<i", it)
    return out


def tiny_llama():
    dim, ffn, heads, layers = 8, 16, 2, 1
    tokens = ["<s>", "</s>", "H", "e", "l", "o", ",", "Ġ", "w", "r", "d", "!", "ll", "He"]
    merges = ["l l", "H e"]
    vocab = len(tokens)
    kvs = [
        kv("general.architecture", 8, "llama"),
        kv("llama.block_count", 4, layers),
        kv("llama.embedding_length", 4, dim),
        kv("llama.feed_forward_length", 4, ffn),
        kv("llama.attention.head_count", 4, heads),
        kv("llama.attention.head_count_kv", 4, heads),
        kv("llama.context_length", 4, 64),
        kv("llama.rope.freq_base", 6, 10000.0),
        kv("llama.attention.layer_norm_rms_epsilon", 6, 1e-5),
        kv("tokenizer.ggml.model", 8, "gpt2"),
        kv("tokenizer.ggml.pre", 8, "smollm"),
        kv("tokenizer.ggml.tokens", 9, (8, tokens)),
        kv("tokenizer.ggml.token_type", 9, (5, [3, 3] + [1] * (vocab - 2))),
        kv("tokenizer.ggml.merges", 9, (8, merges)),
        kv("tokenizer.ggml.bos_token_id", 4, 0),
        kv("tokenizer.ggml.eos_token_id", 4, 1),
        kv("tokenizer.chat_template", 8,
           "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"),
    ]
    tensors = [("token_embd.weight", [dim, vocab])]
    for i in range(layers):
        for n, shape in [("attn_norm", [dim]), ("attn_q", [dim, dim]), ("attn_k", [dim, dim]),
                         ("attn_v", [dim, dim]), ("attn_output", [dim, dim]),
                         ("ffn_norm", [dim]), ("ffn_gate", [dim, ffn]),
                         ("ffn_up", [dim, ffn]), ("ffn_down", [ffn, dim])]:
            tensors.append((f"blk.{i}.{n}.weight", shape))
    tensors.append(("output_norm.weight", [dim]))
    infos, data = b"", b""
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        infos += gguf_str(name) + struct.pack("<I", len(shape))
        infos += b"".join(struct.pack("<Q", d) for d in shape)
        infos += struct.pack("<IQ", 0, len(data))
        data += f32s(n)
        data += b"\0" * (-len(data) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + infos
    head += b"\0" * (-len(head) % 32)
    return head + data


# --- a small PNG (8x6 RGB, one filter type per row) ------------------------------------
def tiny_png():
    w, h = 8, 6
    raw = b""
    for y in range(h):
        raw += bytes([y % 5]) + bytes((x * 31 + y * 17 + c * 7) % 256 for x in range(w) for c in range(3))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


TOKENIZER = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [
        {"id": 0, "content": "[PAD]", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
        {"id": 1, "content": "[UNK]", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
        {"id": 2, "content": "[CLS]", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
        {"id": 3, "content": "[SEP]", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}],
    "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                   "strip_accents": None, "lowercase": True},
    "pre_tokenizer": {"type": "BertPreTokenizer"},
    "post_processor": {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                                  {"Sequence": {"id": "A", "type_id": 0}},
                                  {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                       "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                                          "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
    "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
    "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
              "max_input_chars_per_word": 100,
              "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, ",": 5,
                        "world": 6, "!": 7, "##s": 8, "1": 9, "##2": 10}},
}


def main():
    put("model_files", "tiny_bert", 0, tiny_bert())
    put("model_files", "tiny_llama", 1, tiny_llama())
    put("model_files", "tiny_fasttext", 2, tiny_fasttext(quantized=False))
    put("model_files", "tiny_fasttext_pq", 2, tiny_fasttext(quantized=True))
    put("untrusted_files", "tiny_llama_vocab", 6, tiny_llama())
    put("untrusted_files", "tokenizer_wordpiece", 7, json.dumps(TOKENIZER).encode())
    put("untrusted_files", "batch_jsonl", 8,
        b'{"id": "a", "text": "first note"}\n{"id": 2, "text": "second"}\n"plain"\n\n{"text": 1}\n')
    put("untrusted_files", "batch_journal", 8,
        b'{"item":"a","status":"done","digest":"sha256:00"}\n{"item":"b"')
    put("untrusted_files", "batch_front_matter", 8,
        b'---\njob: "summarize"\nsource: "a.md"\nsource_digest: "sha256:00"\nprompt_tokens: 12\n---\nBody\n')
    put("untrusted_files", "png", 9, tiny_png())
    put("untrusted_files", "journal_line", 0,
        b'{"seq":1,"time":"2026-01-01T00:00:00Z","user":"u","op":"tag","tag":"m:latest"}')
    put("untrusted_files", "npy", 3,
        b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }"
        + b" " * 51 + b"\n" + f32s(4))
    put("untrusted_files", "chat_template", 4,
        b"{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\0hi")
    put("untrusted_files", "audit_policy", 5,
        b'[model]\nref = "minilm"\n[latency]\nrequests = 10\nmax_p95_ms = 50\n')
    print("seeds written under", os.path.join(HERE, "corpus"))


if __name__ == "__main__":
    main()
