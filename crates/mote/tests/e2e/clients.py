"""Drive a running `mote serve` with the real `openai` and `tritonclient` packages.
Usage: clients.py BASE_URL OUT.json. Writes what the clients received, for the Rust test to
compare with `mote run`."""
import base64
import json
import sys

import numpy as np
import openai
import tritonclient.http as httpclient

base, out_path = sys.argv[1], sys.argv[2]
host = base.removeprefix("http://")
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
out = {}

models = client.models.list()
out["models"] = sorted(m.id for m in models.data)

texts = ["How do I reset my password?", "The weather is lovely today.", "ok"]
emb = client.embeddings.create(model="minilm", input=texts)
out["embeddings"] = [d.embedding for d in emb.data]
out["embedding_tokens"] = emb.usage.prompt_tokens
b64 = client.embeddings.create(model="minilm", input=texts[0], encoding_format="base64")
e = b64.data[0].embedding  # a base64 string of little-endian f32 when asked explicitly
if isinstance(e, str):
    e = np.frombuffer(base64.b64decode(e), dtype="<f4").tolist()
out["embedding_base64_first"] = e

raw = client.embeddings.with_raw_response.create(model="minilm", input="x")
out["digest_header"] = raw.headers.get("x-mote-model-digest")

chat = client.chat.completions.create(
    model="smollm2", messages=[{"role": "user", "content": "What is 2 plus 2?"}],
    temperature=0, max_tokens=24)
out["chat"] = chat.choices[0].message.content
out["chat_finish"] = chat.choices[0].finish_reason
out["chat_usage"] = [chat.usage.prompt_tokens, chat.usage.completion_tokens]

pieces = []
stream = client.chat.completions.create(
    model="smollm2", messages=[{"role": "user", "content": "What is 2 plus 2?"}],
    temperature=0, max_tokens=24, stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
out["chat_stream_pieces"] = len(pieces)
out["chat_stream"] = "".join(pieces)

comp = client.completions.create(model="smollm2", prompt="The three primary colors are",
                                 max_tokens=8, temperature=0)
out["completion"] = comp.choices[0].text

try:
    client.embeddings.create(model="nope", input="x")
    out["unknown_model"] = "accepted"
except openai.NotFoundError as e:
    out["unknown_model"] = str(e)

# KServe v2 through tritonclient, with its defaults (binary data for outputs off, inputs
# sent as binary when set_data_from_numpy(binary_data=True), the default).
tc = httpclient.InferenceServerClient(url=host)
out["server_live"] = tc.is_server_live()
out["server_ready"] = tc.is_server_ready()
out["server_metadata"] = tc.get_server_metadata()
out["model_metadata"] = tc.get_model_metadata("mobilenet")
x = np.load(sys.argv[3]).astype(np.float32)
inp = httpclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
res = tc.infer("mobilenet", [inp])
out["mobilenet_logits"] = res.as_numpy(res.get_response()["outputs"][0]["name"]).reshape(-1).tolist()
out["mobilenet_output"] = res.get_response()["outputs"][0]["name"]

json.dump(out, open(out_path, "w"))
