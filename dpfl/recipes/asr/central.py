"""Central training of a seed model, as the DP-FL-for-ASR paper does before federated training.

The seed speakers (the first ``seed-speakers`` of the corpus, by id) are pooled and trained on
with Adam; they are then left out of the federation (see ``seed-speakers`` in the config), and a
federated run starts from the seed with ``init-model = <run-dir>/model.pt``. The seed's data is
treated as public, as in the paper: no privacy is accounted for it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from dpfl.client.train import LocalTrainConfig, batches, global_weights
from dpfl.config import RunConfig
from dpfl.loop.run import load_model_file, pick_device
from dpfl.loop.writer import RunWriter
from dpfl.models.normalization import project_weights
from dpfl.models.optimizers import make_optimizer
from dpfl.recipes import build_task
from dpfl.recipes.asr import asr_options, speech_corpus

log = logging.getLogger(__name__)


def train_central(cfg: RunConfig, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train on the seed speakers for ``central-steps`` steps; write ``model.pt`` and a summary
    to ``run-dir`` (an existing run there is refused unless ``overwrite``); return the
    summary."""
    from dpfl.models.asr.text import CharTokenizer
    from dpfl.recipes.asr.data import SpeechFederatedDataset, split_speakers

    o = asr_options(cfg)
    if cfg.task != "asr":
        raise ValueError("dpfl central trains speech seed models: set task = 'asr'")
    if o.seed_speakers < 1:
        raise ValueError("config key asr.seed-speakers must be >= 1 to train a seed model")
    started = time.perf_counter()
    writer = RunWriter(cfg.run_dir, overwrite=overwrite)
    train, test = speech_corpus(cfg)
    seed_speakers, _ = split_speakers(train, o.seed_speakers)
    dataset = SpeechFederatedDataset(
        train,
        test,
        tokenizer=CharTokenizer(o.alphabet),
        max_test_utterances=o.max_test_utterances,
    )
    data = dataset.pooled_data(seed_speakers)
    test_data = dataset.test_data()
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg)
    task = build_task(cfg)
    model = task.build_model().to(device)
    if cfg.init_model:
        load_model_file(model, cfg.init_model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adam", params, o.central_lr)
    local = LocalTrainConfig(
        steps=o.central_steps,
        batch_size=cfg.batch_size,
        batch_seconds=cfg.batch_seconds,
        grad_clip=cfg.client_grad_clip,
    )
    initial = task.evaluate(model, test_data)
    writer.append({"step": 0, **{f"eval_{k}": v for k, v in initial.items()}})
    generator = torch.Generator().manual_seed(cfg.seed)
    every = max(1, o.central_steps // 10)
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        job = bar.add_task("central training", total=o.central_steps)
        bar.start()
    model.train()
    losses: list[float] = []
    try:
        for step, idx in enumerate(batches(data, local, generator), start=1):
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model, data.batch(idx))
            loss.backward()
            if local.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, local.grad_clip)
            optimizer.step()
            project_weights(model)  # Normalize-and-Project (no-op otherwise)
            losses.append(loss.item())
            if step % every == 0 or step == o.central_steps:
                record = {"step": step, "train_loss": sum(losses) / len(losses)}
                losses.clear()
                if step == o.central_steps or step % (every * 5) == 0:
                    record.update(
                        {f"eval_{k}": v for k, v in task.evaluate(model, test_data).items()}
                    )
                writer.append(record)
                log.info("central step %d: %s", step, json.dumps(record))
            if bar is not None:
                bar.update(job, advance=1)
    finally:
        if bar is not None:
            bar.stop()
    final = task.evaluate(model, test_data)
    summary = {
        "kind": "central seed",
        "speakers": len(seed_speakers),
        "utterances": len(data),
        "hours": sum(data.durations) / 3600,
        "steps": o.central_steps,
        "metric": task.metric,
        "initial": initial,
        "final": final,
        "wall_seconds": time.perf_counter() - started,
        "privacy": {
            "dp": False,
            "rounds_run": 0,
            "rounds_planned": 0,
            "noise_source": "-",
            "text": "central training on the seed speakers' data, treated as public",
        },
        "rounds_run": 0,
    }
    writer.write_summary(summary)
    writer.write_model(global_weights(model))
    writer.close()
    return summary
