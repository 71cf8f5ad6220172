"""Our CTC prefix beam search + ARPA n-gram LM (data2vec.finetune.ctc) against pyctcdecode with
KenLM, on the same model's log-probabilities, the same ARPA file and the same settings.

pyctcdecode is not a dependency: it runs in another Python given by --pyctcdecode-python (a
throwaway venv with `pip install pyctcdecode kenlm`; pyctcdecode 0.5 pins numpy < 2, which our
environment does not). Both decoders get identical inputs through an .npz file; WER / CER are
computed here with the same functions; time is wall-clock decoding only (no model, no loading).

    python benchmarks/ctc_decoders.py --run runs/asr --pyctcdecode-python /tmp/ctcvenv/bin/python
        [--split valid] [--beam 16] [--lm-weight 0.5] [--word-score 0.0] [--limit 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

PYCTC = r"""
import json, sys, time
import numpy as np
from pyctcdecode import build_ctcdecoder
inputs, arpa, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = np.load(inputs)
labels = ["" if s == "<blank>" else (" " if s == "|" else s) for s in settings["symbols"]]
decoder = build_ctcdecoder(labels, kenlm_model_path=arpa or None, alpha=settings["alpha"],
                           beta=settings["beta"])
texts, start = [], time.perf_counter()
for i in range(int(data["count"])):
    texts.append(decoder.decode(data[f"u{i}"], beam_width=settings["beam"]))
print(json.dumps({"texts": texts, "seconds": time.perf_counter() - start}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="fine-tuned asr run")
    parser.add_argument("--pyctcdecode-python", required=True)
    parser.add_argument("--split", default="valid")
    parser.add_argument("--beam", type=int, default=16)
    parser.add_argument("--lm-weight", type=float, default=0.5)
    parser.add_argument("--word-score", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=0, help="utterances (0 = all)")
    args = parser.parse_args()

    import torch

    import data2vec
    from data2vec.finetune import ctc, data, metrics
    from data2vec.finetune.loop import data_root, load_split, predict

    torch.set_num_threads(1)
    model = data2vec.load(args.run)
    ft, cfg, vocab = model.finetune, model.cfg, model.labels["vocab"]
    split = load_split(ft, cfg, args.split, model.labels)
    if args.limit:
        split = data.take(split, list(range(min(args.limit, len(split)))))
    log_probs, _ = predict(model.network, split, ft, 0)
    refs = [ctc.ltr_to_words(t) for t in split.info["ltr"]]
    work = Path(tempfile.mkdtemp(prefix="ctc-bench-"))
    words = [ctc.ltr_to_words(line) for line in data.read_ltr(data_root(cfg, ft), "train")]
    arpa = ctc.write_arpa(words, work / "train.2gram.arpa", order=2)
    lm = ctc.NgramLM.from_arpa(arpa)
    np.savez(work / "logits.npz", count=len(log_probs),
             **{f"u{i}": lp.numpy() for i, lp in enumerate(log_probs)})

    rows = []

    def add(name: str, hyps: list[str], seconds: float) -> None:
        rows.append({"decoder": name, "WER": metrics.word_error_rate(refs, hyps),
                     "CER": metrics.char_error_rate(refs, hyps),
                     "ms/utterance": 1000 * seconds / len(hyps)})

    start = time.perf_counter()
    greedy = [vocab.to_words(ctc.greedy_decode(lp.unsqueeze(0))[0]) for lp in log_probs]
    add("greedy (reference)", greedy, time.perf_counter() - start)
    for name, use_lm in (("ours, no LM", None), ("ours + ARPA bigram", lm)):
        start = time.perf_counter()
        hyps = [ctc.beam_search(lp, vocab, use_lm, args.beam, args.lm_weight, args.word_score)
                for lp in log_probs]
        add(name, hyps, time.perf_counter() - start)
    for name, path in (("pyctcdecode, no LM", ""), ("pyctcdecode + KenLM (same ARPA)", arpa)):
        settings = {"symbols": vocab.symbols, "alpha": args.lm_weight, "beta": args.word_score,
                    "beam": args.beam}
        out = subprocess.run([args.pyctcdecode_python, "-c", PYCTC, str(work / "logits.npz"),
                              str(path), json.dumps(settings)], capture_output=True, text=True,
                             check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        result = json.loads(out.stdout.strip().splitlines()[-1])
        add(name, [" ".join(t.split()) for t in result["texts"]], result["seconds"])
    print(f"{len(refs)} {args.split} utterances of {args.run}; beam {args.beam}, "
          f"lm_weight {args.lm_weight}, word_score {args.word_score}")
    print_table(rows, ["decoder", "WER", "CER", "ms/utterance"])
    print(write_result("ctc_decoders", {"rows": rows, "utterances": len(refs),
                                        "split": args.split, "beam": args.beam,
                                        "lm_weight": args.lm_weight,
                                        "word_score": args.word_score}))


if __name__ == "__main__":
    main()
