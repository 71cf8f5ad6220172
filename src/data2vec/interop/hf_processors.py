"""What HuggingFace's own tools read beside an exported model's weights, so that
``AutoTokenizer`` / ``AutoFeatureExtractor`` / ``AutoImageProcessor`` / ``AutoProcessor`` and
``transformers.pipeline(task, model=DIR)`` work on it. Written for any data2vec export (v1 here;
the files do not depend on the model classes):

- text: the byte-level BPE as a ``RobertaTokenizer`` (vocab.json + merges.txt + tokenizer files;
  ``<s> <pad> </s> <unk> <mask>`` keep our ids), checked at export to give our ids;
- speech: a ``Wav2Vec2FeatureExtractor`` config (16 kHz, zero-mean unit-variance per utterance
  when the model was trained so, attention mask); speech recognition adds the CTC letters as a
  ``Wav2Vec2CTCTokenizer`` (blank = our id 0 = HF's pad, ``|`` = word delimiter) and the two
  together as a ``Wav2Vec2Processor``;
- images: a ``BeitImageProcessor`` config equal to our evaluation transform (short side resized
  bicubic to the model's size, centre crop, /255, the model's mean / std).

Known differences, both small: HF normalises a waveform with variance epsilon 1e-7 where we use
1e-5 (fairseq's), and HF's resize computes a non-square image's long side with int() where we
round, so non-square images can differ by one pixel row before the crop (square ones are equal).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from data2vec.errors import ConfigError

log = logging.getLogger("data2vec")

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
            "mask_token": "<mask>", "sep_token": "</s>", "cls_token": "<s>"}
PROBE = "data2vec reads speech, images and text; <mask> tokens too."


def feature_extractor(cfg: Any):
    """The HF feature extractor equivalent to our speech input pipeline."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=cfg.data.sample_rate,
                                    padding_value=0.0, do_normalize=cfg.data.normalize,
                                    return_attention_mask=True)


def ctc_tokenizer(out_dir: Path, symbols: list[str]):
    """A Wav2Vec2CTCTokenizer over our CTC letters (vocab.json written into `out_dir`)."""
    from transformers import Wav2Vec2CTCTokenizer

    from data2vec.finetune.ctc import WORD_END

    vocab = out_dir / "vocab.json"
    vocab.write_text(json.dumps({s: i for i, s in enumerate(symbols)}, indent=1) + "\n")
    return Wav2Vec2CTCTokenizer(str(vocab), pad_token=symbols[0], unk_token=symbols[0],
                                bos_token=None, eos_token=None, word_delimiter_token=WORD_END,
                                do_lower_case=False)


def image_processor(cfg: Any):
    """The HF image processor equivalent to our evaluation transform (``eval_transform``)."""
    from transformers import BeitImageProcessorPil

    from data2vec.data.images import NORM_STATS

    mean, std = NORM_STATS[cfg.data.image_norm]
    size = cfg.model.frontend.image_size
    return BeitImageProcessorPil(do_resize=True, size={"shortest_edge": size}, resample=3,
                                 do_center_crop=True, crop_size={"height": size, "width": size},
                                 do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                 image_mean=list(mean), image_std=list(std),
                                 do_reduce_labels=False)


def text_tokenizer(out_dir: Path, tokenizer: Any, max_positions: int):
    """Our BPE as a RobertaTokenizer saved in `out_dir`; ConfigError if it would give other
    ids than ours."""
    from transformers import AutoTokenizer, RobertaTokenizer

    tokenizer.save(out_dir)  # vocab.json + merges.txt, read back by HF's own loader
    hf = RobertaTokenizer.from_pretrained(out_dir, add_prefix_space=False,
                                          model_max_length=max_positions, **SPECIALS)
    hf.save_pretrained(out_dir)  # + tokenizer.json and tokenizer_config.json
    again = AutoTokenizer.from_pretrained(out_dir)
    if again(PROBE)["input_ids"] != tokenizer.encode_sentence(PROBE):
        raise ConfigError(f"{out_dir}: the exported HF tokenizer does not reproduce our token ids")
    return again


def write_preprocessing(out_dir: Path, loaded: Any) -> list[str]:
    """Write the tokenizer / feature extractor / processor / image processor files of
    `loaded` (a :class:`data2vec.loading.LoadedModel`) into `out_dir`; returns notes."""
    cfg, notes = loaded.cfg, []
    if cfg.modality == "speech":
        extractor = feature_extractor(cfg)
        if loaded.task == "asr":
            from transformers import Wav2Vec2Processor

            tokenizer = ctc_tokenizer(out_dir, list(loaded.labels["vocab"].symbols))
            Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer) \
                .save_pretrained(out_dir)
        else:
            extractor.save_pretrained(out_dir)
    elif cfg.modality == "image":
        image_processor(cfg).save_pretrained(out_dir)
    elif loaded.tokenizer is not None:
        text_tokenizer(out_dir, loaded.tokenizer, cfg.model.frontend.max_positions)
    else:
        notes.append(f"no tokenizer beside {loaded.source}: the export has no tokenizer files, "
                     "so HF pipelines cannot read text with it")
        log.warning("%s", notes[-1])
    return notes


__all__ = ["ctc_tokenizer", "feature_extractor", "image_processor", "text_tokenizer",
           "write_preprocessing"]
