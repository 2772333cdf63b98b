"""SFT of an ingredient (TRL SFTTrainer) and Bradley-Terry reward models (TRL RewardTrainer).

Each run has its own seed and data order (``seed`` drives both the initialisation of new heads and
the shuffling), writes an HF-format model with tokenizer to a temporary sibling of ``output`` and
renames it into place, with the resolved spec and a model card as provenance. Every ``save_steps``
the Trainer checkpoints to ``OUTPUT.checkpoints/``; a rerun continues from the newest checkpoint
(``soupkit.train.resume``).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from soupkit import adapters
from soupkit.chat import own_template, template_text, use_template
from soupkit.errors import SoupkitError
from soupkit.formats import is_conversational, preference_pair, sft_example
from soupkit.launch import main_process
from soupkit.modeldir import resolve_model_dir
from soupkit.provenance import write_provenance
from soupkit.recipe import RewardModelSpec, SFTSpec, to_plain
from soupkit.storage import atomic_output_dir, check_output_free, check_writable, write_errors
from soupkit.train import resume
from soupkit.train.data import read_examples

Progress = Callable[[int, int], None]


def _args(config_cls: Any, spec: Any, out: Path, **extra: Any) -> Any:
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    return config_cls(
        output_dir=str(resume.checkpoints_dir(out)), seed=spec.seed, data_seed=spec.seed, learning_rate=spec.learning_rate,
        num_train_epochs=spec.epochs, per_device_train_batch_size=spec.batch_size, max_length=spec.max_length,
        save_strategy="steps" if spec.save_steps else "no", save_steps=spec.save_steps or 500,
        save_total_limit=1, report_to=[], logging_steps=10, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        bf16=False, gradient_checkpointing=False, lr_scheduler_type="cosine", warmup_steps=0, **extra,
    )


class _ProgressCallback:
    """Forwards trainer steps to a ``progress(step, total)`` callback."""

    def __new__(cls, progress: Progress) -> Any:
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - HF signature
                progress(state.global_step, state.max_steps)

        return Callback()


class _NoFinalCheckpoint:
    """Skips the checkpoint the Trainer writes after its last step: the complete output is written
    next, and a 7B checkpoint with optimiser state costs minutes and tens of GB."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - HF signature
                if state.global_step >= state.max_steps:
                    control.should_save = False

        return Callback()


def _fit(trainer: Any, progress: Progress | None, out: Path, start: Path | None) -> None:
    """Train, continuing from checkpoint ``start`` if given; a failed checkpoint write is one line."""
    trainer.add_callback(_NoFinalCheckpoint())
    if progress is not None:
        trainer.add_callback(_ProgressCallback(progress))
    with write_errors(resume.checkpoints_dir(out), lambda: _kept(out)), contextlib.redirect_stdout(io.StringIO()):
        trainer.train(resume_from_checkpoint=str(start) if start else None)  # HF prints metrics at the end


@contextlib.contextmanager
def _output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Where this process writes. The main process (the one TRL's Trainer saves from) gets an atomic
    temporary sibling of ``out``; under torchrun / accelerate launch each other process gets a
    private scratch directory that is dropped, so only one process ever replaces ``out``."""
    if main_process():
        with atomic_output_dir(out, force) as tmp:
            yield tmp
    else:
        check_output_free(out, force)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.rank-") as tmp:
            yield Path(tmp)


def _kept(out: Path) -> str:
    last = resume.latest(out)
    return f"the checkpoint {last} is intact and a rerun continues from it" if last else "no checkpoint was written yet"


def _save(trainer: Any, tokenizer: Any, tmp: Path, section: str, spec: Any, card: str) -> None:
    out = Path(spec.output)
    with write_errors(out, lambda: _kept(out)):  # a full disk here keeps the checkpoints for a rerun
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; nobody should need to load it
        write_provenance(tmp, {section: to_plain(spec)}, card)


def train_sft(spec: SFTSpec, *, force: bool = False, progress: Progress | None = None,
              log: Callable[[str], None] | None = None) -> Path:
    """Fine-tune ``spec.base`` on ``spec.data`` (messages, prompt/completion or text; standard or
    conversational), with the chat template ``spec.chat_template`` saved alongside; continue from
    the newest checkpoint of an interrupted run with the same settings unless ``force``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out, where = Path(spec.output), f"sft[{spec.name}]"
    check_writable(out)
    base = resolve_model_dir(spec.base, f"{where}.base")
    rows = read_examples(spec.data, spec.split, sft_example, f"{where}.data")
    tokenizer = AutoTokenizer.from_pretrained(base)
    check_template(tokenizer, spec.chat_template, rows[0], where, base)
    lora = adapters.sft_lora_config(spec, tokenizer, where)  # None: full fine-tuning (issue #19)
    start = _start(spec, out, force, "sft", log)
    with _output_dir(out, force) as tmp:
        model = AutoModelForCausalLM.from_pretrained(base)
        use_template(tokenizer, spec.chat_template, where, model)
        args = _args(SFTConfig, spec, out, completion_only_loss=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
        _fit(trainer, progress, out, start)
        card = f"# {spec.name}\n\nSFT of `{spec.base}` on `{spec.data}` (seed {spec.seed}) with soupkit.\n"
        _save(trainer, tokenizer, tmp, "sft", spec, card)
        if lora is not None:
            adapters.pin_base(tmp, spec.base)
    resume.finish(out)
    return out


def _start(spec: Any, out: Path, force: bool, stage: str, log: Callable[[str], None] | None) -> Path | None:
    start = resume.prepare(spec, out, force, stage)
    if start is not None and log is not None:
        log(f"  resuming from {start}")
    return start


def train_reward_model(spec: RewardModelSpec, *, force: bool = False, progress: Progress | None = None,
                       log: Callable[[str], None] | None = None) -> Path:
    """Bradley-Terry reward model on ``spec.data`` (chosen/rejected with an explicit or implicit
    prompt, standard or conversational, or UltraFeedback-binarized's mix of both); continues an
    interrupted run as ``train_sft`` does."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    out = Path(spec.output)
    check_writable(out)
    base = resolve_model_dir(spec.base, "reward_model.base")
    rows = read_examples(spec.data, spec.split, preference_pair, "reward_model.data")
    tokenizer = AutoTokenizer.from_pretrained(base)
    check_template(tokenizer, spec.chat_template, rows[0], "reward_model", base)
    start = _start(spec, out, force, "reward_model", log)
    with _output_dir(out, force) as tmp:
        model = _reward_head(base, tokenizer, spec.seed, AutoModelForSequenceClassification)
        use_template(tokenizer, spec.chat_template, "reward_model", model)
        args = _args(RewardConfig, spec, out)
        trainer = RewardTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
        _fit(trainer, progress, out, start)
        card = f"# reward model\n\nBradley-Terry reward model from `{spec.base}` on `{spec.data}` with soupkit.\n"
        _save(trainer, tokenizer, tmp, "reward_model", spec, card)
    resume.finish(out)
    return out


def check_template(tokenizer: Any, setting: str, first: dict[str, Any], where: str, base: Path) -> None:
    """Conversational data needs a chat template: refuse before any weight loads when none is set."""
    if not is_conversational(first) or template_text(setting, own_template(tokenizer), where) is not None:
        return
    why = "chat_template is never" if setting == "never" else f"{base} has no chat template"
    raise SoupkitError(f"{where}.data is conversational but {why}; set {where}.chat_template: chatml or a .jinja file")


def _reward_head(base: Path, tokenizer: Any, seed: int, auto_cls: Any) -> Any:
    import torch

    torch.manual_seed(seed)  # the fresh scalar head is the only random part
    model = auto_cls.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model
