"""The built-in speech recipe (the DP-FL-for-ASR paper's workload): a CTC transformer or
Conformer, one user per speaker, read from LibriSpeech or Common Voice folders, or from a corpus
synthesised offline with espeak-ng."""

from __future__ import annotations

import logging

from dpfl.config import RunConfig
from dpfl.recipes import Recipe
from dpfl.recipes.common import check_norm, norm_name

log = logging.getLogger(__name__)

SPEECH_SPLITS = {"commonvoice": ("train.tsv", "test.tsv")}
"""The train and test split names of a speech format (LibriSpeech layout: train, test)."""


def speech_splits(cfg: RunConfig) -> tuple[str, str]:
    """The configured data-train and data-test, or the format's own names."""
    train, test = SPEECH_SPLITS.get(cfg.data_format, ("train", "test"))
    return cfg.data_train or train, cfg.data_test or test


def speech_corpus(cfg: RunConfig):
    """(train utterances, test utterances) of the configured corpus, generating a synthetic one
    on first use. With test-split, the test utterances are held out of data-train."""
    from dpfl.recipes.asr.data import hold_out, read_common_voice, read_librispeech

    if cfg.data_format == "synthetic":
        from dpfl.recipes.asr.synth import generate_corpus

        log.info("synthetic speech corpus in %s", cfg.data_dir)
        generate_corpus(
            cfg.data_dir,
            speakers=cfg.synthetic_speakers,
            utterances=cfg.synthetic_utterances,
            test_speakers=cfg.synthetic_test_speakers,
            seed=cfg.seed,
        )
    read = read_common_voice if cfg.data_format == "commonvoice" else read_librispeech
    train_name, test_name = speech_splits(cfg)
    train = read(cfg.data_dir, train_name)
    if cfg.test_split:
        train, test = hold_out(train, cfg.test_split, cfg.test_fraction, cfg.seed)
        log.info(
            "test set: %d utterances held out of %s by %s (test-fraction %g)",
            len(test),
            train_name,
            cfg.test_split,
            cfg.test_fraction,
        )
        return train, test
    return train, read(cfg.data_dir, test_name)


def task(cfg: RunConfig):
    from dpfl.models.asr.task import ASRTask
    from dpfl.models.asr.text import CharTokenizer

    return ASRTask(
        tokenizer=CharTokenizer(cfg.alphabet),
        arch=cfg.asr_arch,
        size=cfg.asr_size,
        dropout=cfg.asr_dropout,
        layerdrop=cfg.asr_layerdrop,
        spec_augment=cfg.spec_augment,
        norm=norm_name(cfg, "layernorm"),
        norm_options=cfg.norm_options(),
    )


def data(cfg: RunConfig):
    from dpfl.models.asr.text import CharTokenizer
    from dpfl.recipes.asr.data import SpeechFederatedDataset, split_speakers

    train, test = speech_corpus(cfg)
    seed_speakers, _ = split_speakers(train, cfg.seed_speakers)
    dataset = SpeechFederatedDataset(
        train,
        test,
        tokenizer=CharTokenizer(cfg.alphabet),
        test_from_users=cfg.test_split == "utterance",
        exclude=seed_speakers,
        max_test_utterances=cfg.max_test_utterances,
    )
    if cfg.population not in (0, dataset.num_users):
        raise ValueError(
            f"config key population = {cfg.population}, but the corpus in {cfg.data_dir} "
            f"has {dataset.num_users} speakers to federate ({cfg.seed_speakers} kept for "
            f"the seed): set population = {dataset.num_users}"
        )
    return dataset


def check(cfg: RunConfig) -> None:
    if cfg.asr_arch == "conformer" and norm_name(cfg, "layernorm") != "layernorm":
        raise ValueError(
            f"config key norm = {cfg.norm!r}: the Conformer keeps torchaudio's own "
            "normalisation; expected '' or 'layernorm' (or asr-arch = 'transformer')"
        )
    check_norm(cfg, "layernorm", "last", "the ASR transformer")


RECIPE = Recipe("asr", task, data, check, __doc__ or "")
