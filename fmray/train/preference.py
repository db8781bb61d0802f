"""What the preference recipes (`fmray reward`, `fmray dpo`) share around their loops: the plan,
the driver's data preparation, and paired batches.

    plan = prepare_preference_run(config)          # driver: tokenizer, paired rows, plan
    ids, labels = pair_tensors(rows, device)       # worker: chosen rows, then rejected rows

Preparation runs in the driver without Ray (tokenizing pairs is cheap), so a bad record fails
with its one-line error before Ray starts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fmray import storage
from fmray.config import ConfigError
from fmray.train.plan import TrainPlan


class PreferencePlan(TrainPlan):
    """The run plan plus what evaluation and exports need from the chat format."""

    chat_template: str
    """The template pairs were rendered with (saved with every export)."""
    stop_token_ids: list[int]
    """Tokens that end an assistant turn: exported generation stops there."""
    eval_conversations: list[list[dict[str, str]]] = []
    """Held-out prompts with their chosen reply, answered by greedy generation (DPO)."""
    reference_path: str | None = None
    """DPO's frozen reference model (None: the base model, or the LoRA base)."""


def prepare_preference_run(
    config: Any, reference: str | None = None, num_eval_conversations: int = 0
) -> PreferencePlan:
    """Driver-side work before the workers start: tokenizer + template, paired rows, the plan,
    all in the run's storage. A bad record raises ConfigError naming the record and field."""
    from fmray.data.chat_template import stop_token_ids
    from fmray.data.preference_data import build_preference_data
    from fmray.train.launch import (
        check_batch_geometry,
        check_resume,
        data_cache_root,
        local_dir_of,
        prepare_chat_tokenizer,
        resolve_model_path,
        run_dir_of,
        stage_model,
        write_run_config,
    )

    run_dir = run_dir_of(config)
    model_path = resolve_model_path(str(config.model.path))
    data = config.data
    tokenizer, tokenizer_dir = prepare_chat_tokenizer(data.tokenizer, model_path, run_dir)
    try:
        pairs = build_preference_data(
            data,
            config.run.seed,
            str(local_dir_of(tokenizer_dir)),
            tokenizer.chat_template,
            data_cache_root(data.cache_dir, run_dir),
        )
    except ValueError as err:
        raise ConfigError(f"data error: {err}") from None
    source = f"data.source={data.source!r}"
    num_eval_batches = check_batch_geometry(
        config, pairs.num_train_rows, pairs.num_eval_rows, source
    )
    write_run_config(config, run_dir)
    truncated = f", {pairs.num_truncated} with a reply truncated" if pairs.num_truncated else ""
    print(
        f"[fmray] data: {pairs.num_train_rows} train / {pairs.num_eval_rows} eval pairs of "
        f"{pairs.seq_len} tokens{truncated} ({pairs.root})"
    )
    if reference is not None:
        reference = stage_model(resolve_model_path(reference, "dpo.reference"), run_dir)
    return PreferencePlan(
        run_dir=run_dir,
        tokenizer_dir=tokenizer_dir,
        train_data=storage.join(pairs.root, "train"),
        eval_data=storage.join(pairs.root, "eval"),
        seq_len=pairs.seq_len,
        num_train_rows=pairs.num_train_rows,
        num_eval_batches=num_eval_batches,
        model_path=stage_model(model_path, run_dir),
        resume_from=check_resume(config),
        chat_template=tokenizer.chat_template,
        stop_token_ids=stop_token_ids(tokenizer),
        eval_conversations=pairs.eval_conversations[:num_eval_conversations],
        reference_path=reference,
    )


def pair_tensors(
    rows: dict[str, np.ndarray], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of a micro-batch of B pairs as 2B rows: chosen first, then rejected,
    so one forward pass scores both sides."""
    ids = np.concatenate([rows["chosen_input_ids"], rows["rejected_input_ids"]])
    labels = np.concatenate([rows["chosen_labels"], rows["rejected_labels"]])
    return torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device)
