"""Write ``tests/data/speech_tiny_init/``: a pre-trained tiny speech encoder for the CI tests that
fine-tuning learns (a CTC model cannot leave the all-blank output in a CI test's budget from
random weights; from this encoder it does).

Recipe (the README's ``data2vec pretrain --modality speech`` on another demo corpus):

1. the demo speech corpus with seed 1 (the tests fine-tune and score on seed 0's clips, so the
   encoder never heard them);
2. the tiny v1 speech preset with its defaults (2,000 updates);
3. the student's front-end and encoder, fp16 (1.8 MB), and the config as JSON.

    python tests/data/make_speech_init.py                 # ~10 min on 2 cores
    python tests/data/make_speech_init.py --run RUN_DIR   # export an existing run instead
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from data2vec.config import load_config, to_dict
from data2vec.data.demo import prepare_demo
from data2vec.loading import load_checkpoint
from data2vec.train.pretrain import pretrain

OUT = Path(__file__).resolve().parent / "speech_tiny_init"
PARTS = ("frontend.", "encoder.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an existing pre-training run to export")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            data = prepare_demo("speech", Path(tmp) / "speech-seed1", seed=1)
            cfg = load_config("speech", "tiny", 1, None, [f"data.path={data}",
                                                         "run.progress=false"])
            run = Path(tmp) / "run"
            pretrain(cfg, run)
        loaded = load_checkpoint(run)
        weights = {k: v.detach().half().contiguous()
                   for k, v in loaded.network.state_dict().items() if k.startswith(PARTS)}
        OUT.mkdir(exist_ok=True)
        save_file(weights, OUT / "encoder.safetensors",
                  metadata={"recipe": "tests/data/make_speech_init.py"})
        config = to_dict(loaded.cfg)
        config["data"]["path"] = ""  # the corpus lived in a temporary directory
        (OUT / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
