"""Every file in configs/ runs, so a shipped config can never crash again.

Each file runs for one round with only its size changed: rounds, population and cohort, local
steps, the model size, the amount of generated data and the data paths (pointed at data made
here: an espeak-ng corpus in the file's own layout, synthetic scenes). Every other key of the
file must reach the run's config.json unchanged.
"""

import json
import tomllib
from pathlib import Path

import pytest

from dpfl.config import RunConfig
from dpfl.recipes.asr.synth import espeak_available, generate_corpus
from dpfl.simulation import simulate

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))

if not espeak_available():  # CI and `make setup` install it
    pytest.fail("espeak-ng is required (apt-get install espeak-ng)", pytrace=False)

# A small corpus: 3 training and 1 test speaker, 2 utterances each.
SPEAKERS, UTTERANCES, TEST_SPEAKERS = 3, 2, 1


def size_overrides(name: str, data: dict, tmp: Path) -> dict:
    """What may change so the file runs here in seconds; everything else stays as shipped."""
    over: dict = {"rounds": 1, "local-steps": 1, "run-dir": str(tmp / "run")}
    asr = data.get("asr", {})
    if data.get("task") == "asr":
        over["asr.size"] = "tiny"
        corpus = tmp / "corpus"
        if asr.get("data-format") == "synthetic":
            over.update(
                {
                    "asr.data-dir": str(corpus),
                    "asr.synthetic-speakers": SPEAKERS,
                    "asr.synthetic-utterances": UTTERANCES,
                    "asr.synthetic-test-speakers": TEST_SPEAKERS,
                    "asr.seed-speakers": 1,
                    "population": SPEAKERS - 1,
                    "cohort-size": float(SPEAKERS - 1),
                }
            )
        else:  # a real corpus folder: generate one in the file's layout
            layout = {"commonvoice": "commonvoice", "librispeech": "librispeech"}[
                asr["data-format"]
            ]
            generate_corpus(corpus, SPEAKERS, UTTERANCES, TEST_SPEAKERS, seed=5, layout=layout)
            over.update(
                {
                    "asr.data-dir": str(corpus),
                    "population": SPEAKERS - asr.get("seed-speakers", 0),
                    "cohort-size": float(SPEAKERS - asr.get("seed-speakers", 0)),
                }
            )
    elif data.get("task") == "localization":
        over.update(
            {
                "localization.scenes-dir": str(tmp / "scenes"),
                "localization.scene-train-frames": 4,
                "localization.scene-test-frames": 2,
            }
        )
    else:
        over.update({"population": 50, "cohort-size": 5.0})
    return over


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_runs_with_only_its_size_changed(path, tmp_path):
    data = tomllib.loads(path.read_text())
    over = size_overrides(path.stem, data, tmp_path)
    cfg = RunConfig.from_mapping(over, RunConfig.from_toml(path))
    summary = simulate(cfg, progress=False)
    assert summary["rounds_run"] == 1
    written = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    from flwr.common.config import flatten_dict

    kept = {key: value for key, value in flatten_dict(data).items() if key not in over}
    assert {key: written[key] for key in kept} == kept
    assert any("." in key for key in kept) or data.get("task") == "classification"
    assert summary["final"], "the last round evaluates"
