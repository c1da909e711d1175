"""The built-in speech recipe (the DP-FL-for-ASR paper's workload): a CTC transformer or
Conformer, one user per speaker, read from LibriSpeech or Common Voice folders, or from a corpus
synthesised offline with espeak-ng."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dpfl.config import RunConfig, Table, not_one_of, register_table
from dpfl.recipes import Recipe, with_population
from dpfl.recipes.common import check_norm, norm_name

log = logging.getLogger(__name__)

CHOICES = {
    "arch": ("transformer", "conformer"),
    "size": ("tiny", "deep", "small", "paper"),
    "data_format": ("synthetic", "librispeech", "commonvoice"),
    "test_split": ("", "speaker", "utterance"),
    "alphabet": ("en", "latin"),
}


def _doc(text: str) -> dict:
    return {"doc": text}


@dataclass(frozen=True)
class ASROptions:
    """The keys of the ``[asr]`` table."""

    arch: str = field(default="transformer", metadata=_doc("transformer or conformer"))
    size: str = field(
        default="tiny",
        metadata=_doc("tiny, deep (16 narrow blocks: 3.4x tiny's tensors), small or paper"),
    )
    dropout: float = field(default=0.3, metadata=_doc("dropout"))
    layerdrop: float = field(default=0.3, metadata=_doc("layer-drop (transformer)"))
    spec_augment: bool = field(default=True, metadata=_doc("SpecAugment in training"))
    data_format: str = field(
        default="synthetic", metadata=_doc("corpus format: synthetic, librispeech or commonvoice")
    )
    data_dir: str = field(default="data/synthetic-speech", metadata=_doc("corpus folder"))
    data_train: str = field(
        default="",
        metadata=_doc(
            "LibriSpeech subset folder or Common Voice TSV to train on ('': the format's own, "
            "train or train.tsv)"
        ),
    )
    data_test: str = field(
        default="",
        metadata=_doc(
            "LibriSpeech subset folder or Common Voice TSV to test on ('': the format's own, "
            "test or test.tsv; ignored with test-split)"
        ),
    )
    test_split: str = field(
        default="",
        metadata=_doc(
            "for a corpus without a test set: hold out test-fraction of the speakers ('speaker': "
            "they leave the federation) or of every speaker's utterances ('utterance': "
            "evaluation then uses users' data and is labelled non-private); '' reads data-test"
        ),
    )
    test_fraction: float = field(
        default=0.1, metadata=_doc("the fraction test-split holds out, in (0, 1)")
    )
    alphabet: str = field(
        default="en",
        metadata=_doc(
            "output characters: en (a-z, space, ' and -) or latin (en plus the paper's accented "
            "letters for French and German); the model's output size follows it"
        ),
    )
    synthetic_speakers: int = field(default=40, metadata=_doc("synthetic corpus: speakers"))
    synthetic_utterances: int = field(
        default=10, metadata=_doc("synthetic corpus: utterances per speaker")
    )
    synthetic_test_speakers: int = field(
        default=8, metadata=_doc("synthetic corpus: held-out test speakers")
    )
    seed_speakers: int = field(
        default=0, metadata=_doc("speakers kept out of the federation for a central seed")
    )
    max_test_utterances: int = field(
        default=200, metadata=_doc("evaluate on at most this many utterances (0: all)")
    )
    feature_cache: str = field(
        default="",
        metadata=_doc(
            "folder of the log-mel feature store, filled on first use of each utterance "
            "('': <data-dir>/.dpfl-features, or the user's cache folder where data-dir is not "
            "writable; 'off': decode the audio on every use)"
        ),
    )
    central_steps: int = field(default=1000, metadata=_doc("dpfl central: training steps"))
    central_lr: float = field(default=1e-3, metadata=_doc("dpfl central: Adam learning rate"))

    def check(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(
                f"config key asr.{name.replace('_', '-')} = {getattr(self, name)!r}: expected "
                f"{accepted}"
            )

        for name, choices in CHOICES.items():
            accepted = not_one_of(getattr(self, name), choices)
            if accepted:
                raise bad(name, accepted)
        for name in ("dropout", "layerdrop"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "a number in [0, 1)")
        for name in ("synthetic_speakers", "synthetic_utterances", "central_steps"):
            if getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        for name in ("synthetic_test_speakers", "seed_speakers", "max_test_utterances"):
            if getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        if not 0 < self.test_fraction < 1:
            raise bad("test_fraction", "a number in (0, 1)")
        if self.central_lr <= 0:
            raise bad("central_lr", "a number > 0")


TABLE = register_table(
    Table(
        "asr",
        ASROptions,
        aliases={
            "asr-arch": "arch",
            "asr-size": "size",
            "asr-dropout": "dropout",
            "asr-layerdrop": "layerdrop",
            **{
                key: key
                for key in (
                    "spec-augment", "data-format", "data-dir", "data-train", "data-test",
                    "test-split", "test-fraction", "alphabet", "synthetic-speakers",
                    "synthetic-utterances", "synthetic-test-speakers", "seed-speakers",
                    "max-test-utterances", "feature-cache", "central-steps", "central-lr",
                )
            },  # fmt: skip
        },
    )
)


def asr_options(cfg: RunConfig) -> ASROptions:
    return cfg.options("asr")


SPEECH_SPLITS = {"commonvoice": ("train.tsv", "test.tsv")}
"""The train and test split names of a speech format (LibriSpeech layout: train, test)."""


def speech_splits(cfg: RunConfig) -> tuple[str, str]:
    """The configured data-train and data-test, or the format's own names."""
    o = asr_options(cfg)
    train, test = SPEECH_SPLITS.get(o.data_format, ("train", "test"))
    return o.data_train or train, o.data_test or test


def speech_corpus(cfg: RunConfig, node: bool = False):
    """(train utterances, test utterances) of the configured corpus, generating a synthetic one
    on first use. With test-split, the test utterances are held out of data-train.

    ``node``: as one node of a deployment reads it: the transcripts only (text), no audio file
    checked or synthesised, and no test set (the server evaluates)."""
    o = asr_options(cfg)
    from dpfl.recipes.asr.data import hold_out, read_common_voice, read_librispeech

    if o.data_format == "synthetic":
        log.info("synthetic speech corpus in %s", o.data_dir)
        synthesise(cfg, only_speakers=() if node else None)
    read = read_common_voice if o.data_format == "commonvoice" else read_librispeech
    train_name, test_name = speech_splits(cfg)
    train = read(o.data_dir, train_name, check_audio=not node)
    if o.test_split:
        train, test = hold_out(train, o.test_split, o.test_fraction, cfg.seed)
        log.info(
            "test set: %d utterances held out of %s by %s (test-fraction %g)",
            len(test),
            train_name,
            o.test_split,
            o.test_fraction,
        )
        return train, ([] if node else test)
    return train, ([] if node else read(o.data_dir, test_name))


def synthesise(cfg: RunConfig, only_speakers=None) -> None:
    """The configured synthetic corpus (``only_speakers``: see ``generate_corpus``)."""
    from dpfl.recipes.asr.synth import generate_corpus

    o = asr_options(cfg)
    generate_corpus(
        o.data_dir,
        speakers=o.synthetic_speakers,
        utterances=o.synthetic_utterances,
        test_speakers=o.synthetic_test_speakers,
        seed=cfg.seed,
        only_speakers=only_speakers,
    )


def feature_store(cfg: RunConfig):
    """The corpus's feature store as ``asr.feature-cache`` says, or None ('off')."""
    from dpfl.recipes.asr.features import FeatureStore, default_folder

    o = asr_options(cfg)
    if o.feature_cache == "off":
        return None
    return FeatureStore(o.feature_cache or default_folder(o.data_dir))


def task(cfg: RunConfig):
    o = asr_options(cfg)
    from dpfl.models.asr.task import ASRTask
    from dpfl.models.asr.text import CharTokenizer

    return ASRTask(
        tokenizer=CharTokenizer(o.alphabet),
        arch=o.arch,
        size=o.size,
        dropout=o.dropout,
        layerdrop=o.layerdrop,
        spec_augment=o.spec_augment,
        norm=norm_name(cfg, "layernorm"),
        norm_options=cfg.norm_options(),
    )


def data(cfg: RunConfig, user: int | None = None):
    """The speakers as users. ``user``: the one a node trains (a Flower SuperNode): only its
    audio is read, or synthesised, and any other user's data is refused."""
    o = asr_options(cfg)
    from dpfl.models.asr.text import CharTokenizer
    from dpfl.recipes.asr.data import SpeechFederatedDataset, split_speakers

    train, test = speech_corpus(cfg, node=user is not None)
    seed_speakers, _ = split_speakers(train, o.seed_speakers)
    dataset = SpeechFederatedDataset(
        train,
        test,
        tokenizer=CharTokenizer(o.alphabet),
        test_from_users=o.test_split == "utterance",
        exclude=seed_speakers,
        max_test_utterances=o.max_test_utterances,
        features=feature_store(cfg),
    )
    seed = f", {o.seed_speakers} speakers kept for the seed" if o.seed_speakers else ""
    with_population(
        cfg, dataset.num_users, f"the corpus in {o.data_dir} (a user per speaker{seed})"
    )
    if user is None:
        return dataset
    dataset.for_node(user)
    if o.data_format == "synthetic":
        synthesise(cfg, only_speakers=[dataset.speakers[user]])
    return dataset


def check(cfg: RunConfig) -> None:
    o = asr_options(cfg)
    if o.arch == "conformer" and norm_name(cfg, "layernorm") != "layernorm":
        raise ValueError(
            f"config key norm = {cfg.norm!r}: the Conformer keeps torchaudio's own "
            "normalisation; expected '' or 'layernorm' (or asr.arch = 'transformer')"
        )
    check_norm(cfg, "layernorm", "last", "the ASR transformer")


RECIPE = Recipe("asr", task, data, check, __doc__ or "")
